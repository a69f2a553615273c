"""Print pyproject.toml's requirements ([project] dependencies and the named extras), one a line.

The Dockerfile installs them in a layer of their own before it copies the sources, so that a
change to the sources does not download torch again:

    python3 containers/requirements.py pyproject.toml cu13 > requirements.txt
"""

from __future__ import annotations

import sys

import tomllib


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: requirements.py PYPROJECT [EXTRA ...]", file=sys.stderr)
        return 2
    path, *extras = argv
    with open(path, "rb") as f:
        project = tomllib.load(f)["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
