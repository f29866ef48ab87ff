"""Online Subspace Descent (Liang et al. 2024, arXiv:2408.12857): GaLore whose basis is never
recomputed by SVD but moved every step by online PCA (see ``projectors/online_pca.py``)."""

from __future__ import annotations


def osd(model_or_named_parameters, lr: float = 1e-3, rank: int = 128, scale: float = 0.25, inner: str = "adamw",
        targets=None, *, pca_lr: float = 0.5, **options):
    """GaLore with the ``online_pca`` projector (update_gap is irrelevant: the basis moves every step)."""
    from ..errors import ConfigError
    from .galore import galore
    fixed = sorted({"update_gap", "projector"} & set(options))
    if fixed:
        raise ConfigError(f"osd fixes {', '.join(fixed)} (projector 'online_pca', its basis moves every step)")
    popts = dict(options.pop("projector_options", None) or {})
    popts.setdefault("pca_lr", pca_lr)
    opt = galore(model_or_named_parameters, lr=lr, rank=rank, update_gap=1, scale=scale, projector="online_pca",
                 inner=inner, targets=targets, projector_options=popts, **options)
    for g in opt.param_groups:
        if g["method"] == "galore":
            g["method"] = "osd"
    return opt
