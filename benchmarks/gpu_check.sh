#!/usr/bin/env bash
# The CUDA paths on one GPU, as one prepared call of the device tool (never CI):
#   configs/tiny.yaml end to end on cpu and on cuda (prefix student with student-copy discriminators;
#   cross_attention student with teacher-decoder discriminators), under torchrun with 1 process (no process
#   group is made for one process, so this is the launcher's path, not NCCL's),
#   and on cuda killed inside distill (GROUNDGAN_FAULT=step:6) then resumed; benchmarks/gpu_compare.py
#   compares them. Packages the GPU image lacks travel as wheels in .whl/ (see the device tool's README).
#   bash benchmarks/gpu_check.sh          # writes logs and summary.txt under $OUT (default /tmp/gpu_check)
set -u
OUT=${OUT:-/tmp/gpu_check}
W=/tmp/gg
rm -rf "$W" && mkdir -p "$W" "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')" | tee "$OUT/summary.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/summary.txt"
CA="distill.student.style=cross_attention"
run() {  # name, then overrides
  local name=$1; shift
  local t0=$SECONDS
  python3 -m pipeline run configs/tiny.yaml --run-dir "$W/$name" run.num_threads=4 "$@" > "$W/$name.log" 2>&1
  echo "$name: rc=$? in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}
# The cuda runs label with a float32 teacher, so that their data matches the cpu runs' and the comparison is
# of training numerics (bf16 autocast); cuda_fp16 runs the default half-precision teacher.
F32="modalities.audio.teacher.fp16_on_cuda=false"
run cpu run.device=cpu
run cuda run.device=cuda $F32
run cuda_fp16 run.device=cuda
run cpu_ca run.device=cpu $CA
run cuda_ca run.device=cuda $CA $F32
t0=$SECONDS
NCCL_DEBUG=VERSION python3 -m torch.distributed.run --nproc_per_node 1 -m pipeline run configs/tiny.yaml \
  --run-dir "$W/nccl" run.device=cuda run.num_threads=4 $F32 > "$W/nccl.log" 2>&1
echo "nccl: rc=$? in $((SECONDS - t0)) s; $(grep -m1 -o 'NCCL version [^ ]*' "$W/nccl.log")" | tee -a "$OUT/summary.txt"
GROUNDGAN_FAULT=step:6 run resume run.device=cuda $F32
mv "$W/resume.log" "$W/resume_killed.log"
run resume run.device=cuda $F32
python3 benchmarks/gpu_compare.py "$W" | tee -a "$OUT/summary.txt"
rc=${PIPESTATUS[0]}
tar czf "$OUT/logs.tgz" -C "$W" $(cd "$W" && ls *.log)
exit $rc
