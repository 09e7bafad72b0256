"""`passn serve` arguments refused before anything starts: a tensor-parallel replica holds exactly
as many whole GPUs as it splits the model over."""

import pytest

from jobs.cli import main
from jobs.serve import check_tensor_parallel


def test_a_tensor_parallel_replica_needs_as_many_gpus(capsys):
    check_tensor_parallel(1, 0.0)  # the default: one engine process, any share
    check_tensor_parallel(2, 2.0)
    for tp, gpus in [(2, 1.0), (2, 0.5), (4, 2.0)]:
        with pytest.raises(ValueError, match=f"set --gpus-per-replica {tp}"):
            check_tensor_parallel(tp, gpus)
    with pytest.raises(ValueError, match="at least 1"):
        check_tensor_parallel(0, 0.0)
    code = main(["serve", "--checkpoint", "m=runs/none", "--no-auth", "--tensor-parallel", "2",
                 "--gpus-per-replica", "1"])
    assert code == 2 and "set --gpus-per-replica 2 (it is 1)" in capsys.readouterr().err
