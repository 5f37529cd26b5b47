"""Print the README command that follows a `<!-- ci: NAME -->` marker (the next ```bash block),
so CI runs exactly what the README tells a new user to run."""

import re
import sys
from pathlib import Path


def readme_command(readme: str, name: str) -> str:
    match = re.search(rf"<!-- ci: {re.escape(name)} -->\s*```bash\n(.*?)\n```", readme, re.S)
    if match is None:
        raise SystemExit(f"README.md has no `<!-- ci: {name} -->` marker before a ```bash block")
    return match.group(1).strip()


if __name__ == "__main__":
    print(readme_command(Path(__file__).resolve().parents[1].joinpath("README.md").read_text(), sys.argv[1]))
