"""Tune and compile agree on the target: the host is LLVM's detected CPU; a database tuned for another CPU or
core count is reported as such (not as "no tuning record"); an LLVM-unknown CPU is a one-line error."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvmquant import cli  # noqa: E402
from tvmquant.schedules import x86  # noqa: E402
from tvmquant.schedules.x86 import database  # noqa: E402
from tvmquant.target import as_target, cpu_flags, host_mcpu, host_target  # noqa: E402


def test_host_target_is_the_detected_cpu_and_the_default_everywhere():
    host = host_target()
    assert str(host.attrs["mcpu"]) == host_mcpu()
    # LLVM's own name, unless the CPU flags show INT8 features it lacks (a hypervisor's misreported model).
    features = {str(f) for f in tvm.target.codegen.llvm_get_cpu_features(host)}
    flags = cpu_flags()
    assert ("amx_int8" in flags) == ("amx-int8" in features) and ("avx512_vnni" in flags) == ("avx512vnni" in features)
    # tune (tuning.tune, x86.tune) and compile (compile.build, QuantizedModel.compile) all start from these.
    for default in (as_target(None), as_target("llvm"), x86.x86_target()):
        assert database._key(default) == database._key(host)


def _database_with_a_record_for(target, tmp_path):
    """A JSON database holding one record, for ``target``, of the tiny model's conv kernel."""
    import os
    import sys

    from tvm.s_tir import meta_schedule as ms

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_schedules_x86 import conv_module

    mod, _, _ = conv_module((1, 16, 8, 8), [(16, 3, 1, 1, 1)], np.random.default_rng(0))
    task = next(t for t in x86.extract_tasks(mod, host_target(2)) if "conv2d" in t.task_name)
    context = ms.TuneContext(
        mod=task.dispatched[0], target=host_target(2), space_generator="post-order-apply", task_name="t", rand_state=0
    )
    sketch = list(context.generate_design_space())[0]
    db = database._open_database(str(tmp_path / "db"))
    workload = db.commit_workload(task.dispatched[0])
    db.commit_tuning_record(
        ms.database.TuningRecord(
            sketch.trace, workload, [1e-3], target, ms.arg_info.ArgInfo.from_prim_func(task.dispatched[0]["main"])
        )
    )
    return mod, str(tmp_path / "db")


@pytest.mark.parametrize(
    "tuned,expected",
    [
        ({"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2}, "tuned for sapphirerapids, 2 cores"),
        ({"kind": "llvm", "mcpu": host_mcpu(), "num-cores": 7}, f"tuned for {host_mcpu()}, 7 cores"),
    ],
)
def test_database_for_another_cpu_or_core_count_is_reported_as_such(tuned, expected, tmp_path):
    tuned_target = tvm.target.Target(tuned)
    mod, db = _database_with_a_record_for(tuned_target, tmp_path)
    here = host_target(2)
    assert database.target_mismatch(db, here).startswith(f"{db} was {expected} (1 records), building for ")
    assert not database.records_for_target(db, here).get_all_tuning_records()
    assert database.records_for_target(db, tuned_target).get_all_tuning_records()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x86.build(mod, here, db_dir=db)
    messages = [str(w.message) for w in caught if "build:" in str(w.message)]
    assert len(messages) == 1, messages
    assert expected in messages[0] and f"building for {host_mcpu()}, 2 cores" in messages[0]
    assert "re-tune" in messages[0] and "--target" in messages[0] and "no tuning record" not in messages[0]
    # ... and the --target that builds for the records (the record's own target, as JSON).
    assert f'"mcpu": "{tuned["mcpu"]}"' in messages[0] and f'"num-cores": {tuned["num-cores"]}' in messages[0]


def test_unknown_mcpu_is_a_one_line_error(capsys, tmp_path):
    with pytest.raises(ValueError, match=r"LLVM does not know the CPU 'nosuchlake'"):
        as_target('{"kind": "llvm", "mcpu": "nosuchlake"}')
    with pytest.raises(ValueError, match=r"LLVM does not know the CPU 'nosuchlake'"):
        x86.x86_target("nosuchlake")
    target = '{"kind": "llvm", "mcpu": "nosuchlake"}'
    assert cli.main(["compile", "model.tvmq", "-o", str(tmp_path / "x.so"), "--target", target]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nosuchlake" in err, err


def test_host_cpu_follows_the_flags_when_the_model_number_misleads_llvm(tmp_path):
    """A hypervisor's Xeon with AMX that reports model 167 (LLVM: "rocketlake", no AMX) is built for as one
    with AMX; flags that LLVM's name already covers keep LLVM's name."""
    amx = tmp_path / "amx"
    amx.write_text(
        "flags\t\t: fpu avx2 fma avx512f avx512bw avx512vl avx512_vnni avx_vnni avx512_bf16 avx512_fp16 "
        "amx_tile amx_int8 amx_bf16\n"
    )
    mcpu = host_mcpu(str(amx))
    features = {
        str(f) for f in tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))
    }
    assert (
        {"amx-int8", "amx-tile", "avx512vnni"} <= features
        and "amx-fp16" not in features
        or "amx-fp16" in str(tvm.target.codegen.llvm_get_system_cpu())
    )
    plain = tmp_path / "sse"
    plain.write_text("flags\t\t: fpu sse sse2\n")
    assert host_mcpu(str(plain)) == str(tvm.target.codegen.llvm_get_system_cpu())
