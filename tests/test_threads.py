"""tvmquant.threads: TVM's CPU thread pool gets one thread per physical core unless the user chose."""

import os
import subprocess
import sys

from tvmquant.threads import default_num_threads

CODE = (
    "import os, tvm; from tvmquant.threads import use_physical_cores; "
    "chosen = use_physical_cores(); print(chosen, os.environ['TVM_NUM_THREADS'], tvm.runtime.num_threads())"
)


def _run(env_threads):
    env = {key: value for key, value in os.environ.items() if key != "TVM_NUM_THREADS"}
    if env_threads is not None:
        env["TVM_NUM_THREADS"] = env_threads
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
    return [int(value) for value in out.stdout.split()]


def test_pool_uses_physical_cores_by_default():
    cores = default_num_threads()
    assert 1 <= cores <= (os.cpu_count() or 1)
    # the pool really starts with that many threads (TVM alone would take half the logical CPUs on x86)
    assert _run(None) == [cores, cores, cores]


def test_user_choice_is_kept():
    assert _run("1") == [1, 1, 1]
