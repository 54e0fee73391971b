"""``python -m jaxnorm.kernels {status,build}``: see :mod:`jaxnorm.kernels`."""

from __future__ import annotations

import argparse
import sys

from jaxnorm import kernels


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m jaxnorm.kernels",
    description="jaxnorm's CPU kernels: status, or build them now.",
  )
  p.add_argument(
    "command",
    choices=("status", "build"),
    help="status: whether the kernels are built, where, and "
    "whether they are used; build: compile them now",
  )
  args = p.parse_args(argv)
  if args.command == "build":
    try:
      path = kernels.build()
    except RuntimeError as e:
      print(e, file=sys.stderr)
      return 1
    print(f"built: {path}")
  print(kernels.status())
  return 0


if __name__ == "__main__":
  sys.exit(main())
