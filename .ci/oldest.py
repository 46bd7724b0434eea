"""Print pip constraints that pin each dependency pyproject.toml names (the dev extra too)
to the lowest version its bound allows: `name>=X` becomes `name==X`. .ci/run installs with
them and runs the suite, so a lower bound is one the project has been tested on.
Run by Python 3.11 or newer (tomllib)."""

import re
import sys
from pathlib import Path

import tomllib

project = tomllib.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))["project"]
for requirement in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
    found = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?\s*>=\s*([^,\s]+).*", requirement)
    if found is None:
        sys.exit(f"{requirement!r} has no lower bound (name>=version): give it one")
    print(f"{found[1]}=={found[2]}")
