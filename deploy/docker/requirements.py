"""Print an extra's requirements from pyproject.toml, one a line, for a dependencies-only image layer.

    python requirements.py pyproject.toml serve[,tracing...] [--onnxruntime REQ]

The images install the dependencies from this list first (a layer that a source change does not touch),
then the project itself with ``--no-deps``. ``--onnxruntime REQ`` replaces every ``onnxruntime*``
requirement of the extra with REQ (the CPU images take ``onnxruntime==X`` instead of ``onnxruntime-gpu``),
or adds it when the extra has none (the trainer's export verifies with ONNX Runtime).
"""

import argparse
import re

import tomllib


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pyproject")
    parser.add_argument("extras", help="extras, comma-separated")
    parser.add_argument("--onnxruntime", default="", metavar="REQ")
    args = parser.parse_args()
    with open(args.pyproject, "rb") as f:
        optional = tomllib.load(f)["project"]["optional-dependencies"]
    requirements = [r for extra in args.extras.split(",") for r in optional[extra]]
    if args.onnxruntime:
        requirements = [r for r in requirements if not re.match(r"onnxruntime\b", r)] + [args.onnxruntime]
    print("\n".join(requirements))


if __name__ == "__main__":
    main()
