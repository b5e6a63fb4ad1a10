# Sourced by the one-call GPU scripts (run from the repository root): $OUT, the NCCL and
# symmetric-memory settings of the device machines (NVLink multicast off), PYTHONPATH, the
# versions at the top of $OUT/tests.log ($log), and $PYTEST (a variable, not a function, so
# that `timeout` can run it). Sets $start for the scripts' elapsed-time lines.
OUT=${OUT:-gpu_out}; export OUT; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
start=$SECONDS
log="$OUT/tests.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])" | tee "$log"
export DTP_FAILURE_LOG="$OUT/failures.log"  # each failure as it happens (tests/conftest.py)
PYTEST="python3 -m pytest -v -m gpu -p no:cacheprovider"
