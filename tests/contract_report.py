"""Per optimizer, how many contract checks pass: runs tests/test_contract.py and counts.

    .venv/bin/python tests/contract_report.py [-n 2]

Prints one line per entry of the contract table: checks passed, checks that still fail
(marked xfail, with their reasons in test_contract.py), checks that do not apply (skipped:
a torch input that does not apply, with its reason). Table-wide checks (every export has an
entry) are counted apart.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from optimizer_contract import ENTRIES  # noqa: E402


def outcome(case: ET.Element) -> str:
    for child in case:
        if child.tag == "skipped":
            return "xfail" if child.get("type") == "pytest.xfail" else "skipped"
        if child.tag in ("failure", "error"):
            return "failed"
    return "passed"


def entry_of(name: str, names: set[str]) -> str:
    match = re.search(r"\[(.*)\]$", name)
    tokens = re.split(r"[-\[\]]", match.group(1)) if match else []
    found = [token for token in tokens if token in names]
    return found[0] if found else "(table-wide)"


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "contract.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "test_contract.py"),
                   f"--junitxml={report}", *argv]
        subprocess.run(command, check=False, cwd=HERE.parent)
        cases = ET.parse(report).getroot().iter("testcase")
        names = {entry.name for entry in ENTRIES}
        counts: dict[str, Counter] = {}
        for case in cases:
            counts.setdefault(entry_of(case.get("name", ""), names), Counter())[outcome(case)] += 1
    print(f"\n{'optimizer':<14}{'passed':>8}{'xfail':>8}{'failed':>8}{'skipped':>9}")
    for name in [entry.name for entry in ENTRIES] + ["(table-wide)"]:
        c = counts.get(name, Counter())
        print(f"{name:<14}{c['passed']:>8}{c['xfail']:>8}{c['failed']:>8}{c['skipped']:>9}")
    total = sum(counts.values(), Counter())
    print(f"{'total':<14}{total['passed']:>8}{total['xfail']:>8}{total['failed']:>8}{total['skipped']:>9}")
    return 1 if total["failed"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
