"""Imported at start-up by every Python process the tests launch (`conftest.nnunet_env` puts this folder first on
PYTHONPATH): caps the core count that `multiprocessing.cpu_count()` reports at `$nnUNet_semisam_test_cpus`.

Why: on `-device cpu`, `nnUNetv2_train`, `nnUNetv2_predict` and `nnunet-semisam train` call
`torch.set_num_threads(multiprocessing.cpu_count())`, overriding OMP_NUM_THREADS. The suite runs two pytest-xdist
workers on a 2-core machine, so two such commands at once put 4 OpenMP threads on 2 cores, which then spin against each
other: two concurrent `MedSAMMambaKDTrainer_smoke` trainings took 188 s side by side with 2 threads each and 66 s with
1 thread each. The commands themselves are unchanged; only the core count they see is the test worker's share.
"""
import os

_cap = os.environ.get("nnUNet_semisam_test_cpus")
if _cap:
    import multiprocessing

    _real_cpu_count = multiprocessing.cpu_count

    def _capped_cpu_count(_n: int = max(1, int(_cap))) -> int:
        return min(_n, _real_cpu_count())

    multiprocessing.cpu_count = _capped_cpu_count
