"""Shared pieces of the benchmark suite: what machine this is, and where results go."""
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except Exception:
        return None


def machine_info():
    info = {"date": datetime.date.today().isoformat(), "commit": commit(), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__}
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    return info


def write_result(name, payload):
    """Write ``benchmarks/results/<name>.json`` with the machine's description beside the numbers."""
    RESULTS.mkdir(exist_ok=True)
    data = {"machine": machine_info(), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    return data


