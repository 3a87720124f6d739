#!/usr/bin/env python3
"""compose.yml is valid and runs what the binaries accept.

Validates the file with docker-compose (Debian's package; no daemon needed),
then checks each service: its command is a Gatherer binary of this build, and
every GATHERER_* variable it sets is one that binary reads (named in its
--help). Exits 77 (skipped) when docker-compose or PyYAML is missing.

    compose_test.py SOURCE_DIR BUILD_DIR
"""
import os
import shutil
import subprocess
import sys

BINARIES = {
    "gatherer-broker": "broker/gatherer-broker",
    "gatherer-worker": "worker/gatherer-worker",
    "gatherer": "client/gatherer",
    "gatherer-ctl": "ctl/gatherer-ctl",
}


def main():
    source, build = sys.argv[1], sys.argv[2]
    compose = shutil.which("docker-compose")
    try:
        import yaml
    except ImportError:
        yaml = None
    if not compose or yaml is None:
        print("skipped: docker-compose or PyYAML is not installed")
        return 77
    path = os.path.join(source, "compose.yml")
    checked = subprocess.run([compose, "-f", path, "config"], capture_output=True, text=True, timeout=60)
    if checked.returncode != 0:
        print("docker-compose config failed:\n" + checked.stderr)
        return 1
    config = yaml.safe_load(checked.stdout)
    failures = []
    for name, service in config["services"].items():
        command = service.get("command") or []
        if isinstance(command, str):
            command = command.split()
        if not command or command[0] not in BINARIES:
            continue  # the example API is a Python script
        binary = os.path.join(build, BINARIES[command[0]])
        help_text = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30).stdout
        for var in (service.get("environment") or {}):
            if var.startswith("GATHERER_") and var not in help_text:
                failures.append(f"{name}: {command[0]} does not read {var}")
        print(f"{name}: {command[0]} reads {sorted(service.get('environment') or {})}")
        check = (service.get("healthcheck") or {}).get("test") or []
        if check and check[0] == "CMD":
            tool = check[1]
            if tool not in BINARIES:
                failures.append(f"{name}: health check runs {tool}, not a Gatherer binary")
            else:
                help_text = subprocess.run([os.path.join(build, BINARIES[tool]), "--help"], capture_output=True,
                                           text=True, timeout=30).stdout
                for flag in (a for a in check[2:] if a.startswith("--")):
                    if flag not in help_text:
                        failures.append(f"{name}: health check flag {flag} unknown to {tool}")
                if not any(a in help_text for a in check[2:] if not a.startswith("-") and not a[0].isdigit()
                           and "://" not in a):
                    failures.append(f"{name}: health check subcommand unknown to {tool}")
    if "broker" not in config["services"] or "worker" not in config["services"]:
        failures.append("compose.yml needs a broker and a worker service")
    for f in failures:
        print("FAIL: " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
