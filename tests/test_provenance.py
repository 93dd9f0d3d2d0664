"""What a result records about the machine it ran on: enough to tell why two hosts' CPU numbers differ."""

import platform

import torch

from ctssl.provenance import cpu_model, environment


def test_environment_names_the_cpu_its_vector_path_and_the_threads():
    torch.set_num_threads(1)
    env = environment()
    assert env["torch"] == torch.__version__ and env["platform"] == platform.platform()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["cpu_capability"]
    assert env["torch_threads"] == "1"
    assert env["cpu"] == cpu_model() and env["cpu"] not in ("", None)


def test_cpu_model_reads_linux_cpuinfo(tmp_path, monkeypatch):
    import ctssl.provenance as provenance

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core Processor\n")
    real_path = provenance.Path
    monkeypatch.setattr(provenance, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    assert provenance.cpu_model() == "AMD EPYC 9654 96-Core Processor"
    monkeypatch.setattr(provenance, "Path", lambda p: tmp_path / "missing" if p == "/proc/cpuinfo" else real_path(p))
    assert provenance.cpu_model() == (platform.processor() or "unknown")
