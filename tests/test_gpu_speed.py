"""benchmarks/gpu_speed.py: its whole plan, on the CPU with a tiny network (--dry-run). The GPU figures
themselves come from a run on a GPU machine (docs/ddpm.md); here we check that every setting runs,
is reported, and that the fastest is picked from the table."""
import re

from conftest import run_script


def test_the_dry_run_reports_every_setting_and_picks_the_fastest():
    r = run_script("benchmarks/gpu_speed.py", "--dry-run", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = re.findall(r"^\| (fp32|bf16) \| (NCHW|channels_last) \| (none|default|cuda graphs) \| ([0-9]+) \|",
                      r.stdout, re.M)
    assert len(rows) == 12 and len(set(row[:3] for row in rows)) == 12, r.stdout  # 2 x 2 x 3 settings, once each
    fastest = max(rows, key=lambda row: int(row[3]))
    assert f"fastest: {fastest[0]}, {fastest[1]}, compile {fastest[2]}: {fastest[3]} images/s" in r.stdout
    assert re.search(r"DDIM-50 [0-9.]+ images/s, DDPM-1000 [0-9.]+ images/s", r.stdout), r.stdout


def test_without_a_gpu_it_says_so_in_one_line():
    r = run_script("benchmarks/gpu_speed.py")
    assert r.returncode != 0 and "no CUDA GPU" in r.stderr and len(r.stderr.strip().splitlines()) == 1
