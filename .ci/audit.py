"""Audit the project venv's packages for known vulnerabilities (pip-audit), and say plainly
what was and was not audited.

    python .ci/audit.py .venv          # run from a separate tools venv that has pip-audit

pip-audit runs from its own venv (``make audit`` builds ``.venv-tools``) so that neither it
nor its dependencies are counted as ours or pinned against ours; ``--path`` points it at the
project venv's site-packages. It needs the network (PyPI's JSON API, or OSV with ``-s osv``).

Exit 0 whatever it finds (CI prints the findings, README "Security" says which affect us),
including when the audit could not run. Why the summary: pip-audit prints "No known
vulnerabilities found" even when it could look up none of the packages (a package index that
does not serve ``/pypi/<name>/<version>/json``, as the mirror here); this says how many were
actually checked.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path


def site_packages(venv: Path) -> str:
    return subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def main(argv: list[str]) -> int:
    venv = Path(argv[1] if len(argv) > 1 else ".venv")
    extra = argv[2:]  # e.g. -s osv
    tool = shutil.which("pip-audit", path=str(Path(sys.executable).parent)) or "pip-audit"
    cmd = [tool, "--path", site_packages(venv), "--skip-editable", "--progress-spinner", "off",
           "-f", "json", "--aliases", "on", "--desc", "off", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        print(f"pip-audit: AUDIT DID NOT RUN (exit {proc.returncode}); not failing CI:\n{tail}")
        return 0
    deps = report.get("dependencies", [])
    skipped = [d for d in deps if "skip_reason" in d]
    found = [(d["name"], d["version"], v) for d in deps for v in d.get("vulns", [])]
    print(f"pip-audit: {len(deps)} packages in {venv}, {len(deps) - len(skipped)} audited, "
          f"{len(skipped)} could not be audited, {len(found)} known vulnerabilities")
    for name, version, v in found:
        aliases = ",".join(v.get("aliases") or [])
        fixed = ",".join(v.get("fix_versions") or []) or "no fix"
        print(f"  VULN {name} {version}: {v['id']} ({aliases or 'no aliases'}); fixed in {fixed}")
    if skipped:
        print(f"  not audited, e.g. {skipped[0]['skip_reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
