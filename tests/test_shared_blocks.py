"""Duplication is a feature, drift is a bug: every `# >>> shared: NAME` block is identical in every
script that has it (STYLE.md). A change to a shared block lands in every copy in the same commit."""
import os
import re

from conftest import ROOT

SCRIPTS = ["ddpm.py", "ddim.py", "dcgan.py", "vae.py", "vaegan.py", "fid.py"]
BLOCK = re.compile(r"^# >>> shared: (\S+)\n(.*?)^# <<< shared: \1$", re.S | re.M)


def blocks():
    found = {}
    for script in SCRIPTS:
        path = os.path.join(ROOT, script)
        if os.path.exists(path):
            src = open(path, encoding="utf-8").read()
            opened, closed = (len(re.findall(rf"^# {m} shared: ", src, re.M)) for m in (">>>", "<<<"))
            assert opened == closed == len(BLOCK.findall(src)), f"unbalanced shared markers in {script}"
            for name, body in BLOCK.findall(src):
                found.setdefault(name, {})[script] = body
    return found


def test_every_shared_block_is_identical_in_every_copy():
    for name, copies in blocks().items():
        first_script, first = next(iter(copies.items()))
        for script, body in copies.items():
            assert body == first, f"shared block '{name}' differs between {first_script} and {script}"


def test_every_training_script_shares_the_flags_the_data_and_the_plumbing():
    found = blocks()
    for name in ("flags", "data", "plumbing"):
        assert set(found[name]) == {"ddpm.py", "ddim.py", "dcgan.py", "vae.py", "vaegan.py"}, name


def test_ddim_shares_network_schedule_training_and_sampling_plumbing_with_ddpm_and_only_they_have_torchrun():
    found = blocks()
    for name in ("unet", "diffusion", "generate", "train", "torchrun", "sample_mode"):
        assert set(found[name]) == {"ddpm.py", "ddim.py"}, name
    for script in ("dcgan.py", "vae.py", "vaegan.py", "fid.py"):  # no torchrun code where torchrun never runs
        text = open(os.path.join(ROOT, script), encoding="utf-8").read()
        assert not re.search(r"\b(RANK|WORLD_SIZE|torch\.distributed|DistributedDataParallel)\b", text), script
