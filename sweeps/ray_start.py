"""``ray start`` without the Ray Client server: ``python -m sweeps.ray_start --head ...`` takes the options
of ``ray start``.

Ray 2.60's ``ray start --head`` always starts a Ray Client server (port 10001 unless told another) when
grpc is installed, which it always is, and has no option to leave it out. A sweep's driver runs on the
head node and joins through the control store's port, so that server is one more listening port for
nothing; this entry point starts the head without it. (Should Ray's internals change, the head starts
with its Ray Client server, still behind the token, and a warning says so.)
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    from ray.scripts import scripts

    if callable(getattr(scripts, "get_ray_client_dependency_error", None)):
        scripts.get_ray_client_dependency_error = lambda: ImportError("left out by dartsweep")
    else:
        print("sweeps.ray_start: warning: this Ray starts its Ray Client server anyway", file=sys.stderr)
    sys.argv = ["ray", "start", *argv]
    scripts.main()


if __name__ == "__main__":
    main(sys.argv[1:])
