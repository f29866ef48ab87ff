"""The ``lowrank`` console command's entry point, outside the package on purpose: importing
``lowrank`` loads torch and transformers (about 1.5 s), and a Ctrl-C during that import would
otherwise print a KeyboardInterrupt traceback.  Here it exits quietly with status 130."""

from __future__ import annotations

import signal
import sys


def main() -> None:
    interrupted = []

    def on_sigint(signum, frame):  # noqa: ARG001 - signal handler signature
        interrupted.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        from lowrank.cli import main as run
    except BaseException:
        # a KeyboardInterrupt, or whatever a half-imported module raised after one
        if not interrupted:
            raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        sys.stderr.write("\ninterrupted\n")
        raise SystemExit(130) from None
    run()


if __name__ == "__main__":  # pragma: no cover
    main()
