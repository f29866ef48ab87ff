"""The ``lowrank`` console command's entry point, outside the package on purpose: importing
``lowrank`` loads torch and transformers (about 1.5 s), and a Ctrl-C during that import would
otherwise print a KeyboardInterrupt traceback.  Here it exits quietly with status 130."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from lowrank.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        raise SystemExit(130) from None
    run()


if __name__ == "__main__":  # pragma: no cover
    main()
