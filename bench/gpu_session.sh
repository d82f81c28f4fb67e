#!/usr/bin/env bash
# The speed issue's GPU measurements, grouped so that each group fits one device call (< 10 min).
#
#   bash bench/gpu_session.sh tests     # pytest -m gpu over the core and every plugin (~1 min)
#   bash bench/gpu_session.sh multigpu  # pytest -m multigpu on a machine of 2-8 GPUs (tests/test_multigpu.py;
#                                       # what needs more GPUs than are visible skips, saying how many)
#   bash bench/gpu_session.sh rollout   # engine vs HF at batch 64 (compiled, uncompiled, both MoE decode paths) and 256
#   bash bench/gpu_session.sh train     # train step: eager, compiled at 24.5k and 98k tokens (also with flash
#                                       # varlen attention), 49k with a profile
#   bash bench/gpu_session.sh profile   # one whole generate: wall time vs kernel time, top kernels
#   bash bench/gpu_session.sh specrl    # speculative decoding vs none on a GSM8K-trained target (~5 min;
#                                       # GSM8K in $GSM8K, default ../shared/data/gsm8k)
#   bash bench/gpu_session.sh quant     # expert kernels alone, then FP8 (probe's pick and forced FP8 wgmma)
#                                       # and INT4 rollout vs bf16 on the 30B-A3B preset, batch 64 and 256
#   bash bench/gpu_session.sh onpolicy  # true on-policy mode: matmul tiles vs torch, attention fwd+bwd, the mode's
#                                       # rollout and train-step cost vs normal mode (~0.7B MoE, bf16)
#   bash bench/gpu_session.sh int4      # INT4 expert kernels alone over tile settings (64, 256 tokens; 4096
#                                       # with and without the 64-row tile transposed), INT4 rollout 64, 256
#   bash bench/gpu_session.sh fp8train  # unified-FP8 train step vs bf16 in one process (30B-A3B preset, 2
#                                       # layers, 98k tokens a step), then one FP8 step's top kernels
#   bash bench/gpu_session.sh fp8       # FP8 probe tests, expert kernels per products mode (fp8acc too), FP8
#                                       # rollout at batch 64: probe's pick, fp8acc, dense quant in the GEMM
#   bash bench/gpu_session.sh mismatch  # FP8 rollout-only vs unified train/rollout mismatch (bf16/bf16, fp32/fp32,
#                                       # mixed), R3's mismatch, on the GPU presets
#   bash bench/gpu_session.sh scale-colocate  # GRPO samples/s, N trainer ranks colocated with N engines, N = 1, 2, 4, 8
#   bash bench/gpu_session.sh scale-disagg    # the same, N/2 ranks + N/2 engines, N = 2, 4, 8 (multi-GPU host)
#   bash bench/gpu_session.sh train-scale     # FSDP2 train tok/s and MFU per GPU, 1..8 ranks, 30B-A3B preset
#                                             # (the scale groups take the counts up to the visible GPUs)
#
# On the device machine first: carried wheels (stevedore; setuptools>=77) on PYTHONPATH, then
# python -m pip install --no-deps --no-build-isolation -e . -e plugins/* (registers the entry points).
# Every bench prints one JSON line; stderr carries the profiles.
set -uo pipefail
cd "$(dirname "$0")/.."
R="$PWD"  # absolute, so the per-plugin test sessions below (run from the plugin's folder) import the same code
export PYTHONPATH="$R:$R/plugins/miles_rewards:$R/plugins/miles_r3:$R/plugins/miles_fp8:$R/plugins/miles_int4qat:$R/plugins/miles_specrl${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for group in "${@:-tests}"; do
  case "$group" in
    tests)  # one session per folder: the plugins' conftest modules clash with tests/'s in one session
      python -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -3
      for p in plugins/miles_*/; do (cd "$p" && python -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -3); done ;;
    multigpu)
      python -m pytest -q -rs -m multigpu tests/test_multigpu.py -p no:cacheprovider 2>&1 | tail -25 ;;
    rollout)
      python bench/rollout.py --batch 64 --also-uncompiled --compare-moe 2>&1 | grep -E '^\{|Error'
      python bench/rollout.py --batch 256 --hf-new-tokens 64 --compare-moe 2>&1 | grep -E '^\{|Error' ;;
    train)
      python bench/train_step.py 2>&1 | grep -E '^\{|Error'
      python bench/train_step.py --compile 2>&1 | grep -E '^\{|Error'
      python bench/train_step.py --compile --samples 256 --max-tokens 98304 2>&1 | grep -E '^\{|Error'
      python bench/train_step.py --compile --samples 256 --max-tokens 98304 --packed-attention flash 2>&1 | grep -E '^\{|Error'
      python bench/train_step.py --compile --samples 128 --max-tokens 49152 --profile 2>&1 | grep -v -i warn | tail -44 ;;
    profile) python bench/decode_profile.py --generate 256 2>&1 | grep -v -i warn | tail -34 ;;
    specrl)
      python bench/specrl.py --mode gpu --data "${GSM8K:-../shared/data/gsm8k}" 2>&1 | grep -E '^(\{|target|mtp)|Error' ;;
    quant)
      python bench/quant_experts.py 2>&1 | grep -E '^\{|Error'
      python bench/quant_experts.py --tokens 256 2>&1 | grep -E '^\{|Error'
      for b in 64 256; do
        python bench/fp8_rollout.py --preset qwen3-30b-a3b --batch $b 2>&1 | grep -E '^\{|Error'
        python bench/fp8_rollout.py --preset qwen3-30b-a3b --batch $b --products fp8 2>&1 | grep -E '^\{|Error'
        python bench/int4_rollout.py --preset qwen3-30b-a3b --batch $b 2>&1 | grep -E '^\{|Error'
      done ;;
    fp8)
      python -m pytest -q -p no:cacheprovider -m gpu -s plugins/miles_fp8/tests/test_fp8_triton_dense.py \
        -k "pick_exact or fp8acc or rows_do_not" 2>&1 | grep -E 'probe|mode|passed|failed|Error'
      python bench/quant_experts.py 2>&1 | grep -E '^\{|Error'
      python bench/quant_experts.py --products fp8,fp16 --fp8-down-decode-n 64 2>&1 | grep -E '^\{|Error'
      for extra in "" "--products fp8acc" "--dense-quant kernel" "--expert-block-m 64"; do
        python bench/fp8_rollout.py --preset qwen3-30b-a3b --batch 64 $extra 2>&1 | grep -E '^\{|Error'
      done ;;
    onpolicy)
      python bench/invariant_mm_tune.py 2>&1 | grep -E '^\{|Error|gives other bits'
      python bench/invariant_attn_grad.py 2>&1 | grep -E '^\{|Error'
      python bench/true_on_policy.py --preset gpu 2>&1 | grep -E '^\{|Error' ;;
    mismatch)
      python bench/fp8_mismatch.py --preset gpu 2>&1 | grep -E '^\{|Error'
      python bench/r3_mismatch.py 2>&1 | grep -E '^\{|Error' ;;
    int4)
      for t in 64 256; do
        python bench/quant_experts.py --tokens $t --products fp16 --int4-block-m 16,32,64 \
          --int4-tiles 64:4:3:64,64:4:3:128,64:4:4:128,128:4:3:128,128:8:3:128,128:8:3:64 2>&1 | grep -E '^\{|Error'
      done
      python bench/quant_experts.py --tokens 4096 --products fp16 2>&1 | grep -E '^\{|Error'
      python bench/quant_experts.py --tokens 4096 --products fp16 --int4-swap-max-m 16 2>&1 | grep -E '^\{|Error'
      for b in 64 256; do
        python bench/int4_rollout.py --preset qwen3-30b-a3b --batch $b 2>&1 | grep -E '^\{|Error'
      done ;;
    fp8train)
      python bench/train_step.py --preset qwen3-30b-a3b --layers 2 --fp8-recipe blockwise --compare-bf16 2>&1 | grep -E '^\{|Error'
      python bench/train_step.py --preset qwen3-30b-a3b --layers 2 --fp8-recipe blockwise --steps 1 --profile 2>&1 | grep -v -i warn | tail -30 ;;
    scale-colocate|scale-disagg|train-scale)
      gpus=$(python -c "import torch; print(torch.cuda.device_count())")  # CUDA_VISIBLE_DEVICES's
      counts=$(for n in 1 2 4 8; do [ "$n" -le "$gpus" ] && printf '%s,' "$n"; done)
      case "$group" in
        scale-colocate) python bench/scale.py --modes colocate --gpus "${counts%,}" 2>&1 | grep -E '^\{|Error' ;;
        scale-disagg) python bench/scale.py --modes disagg --gpus "${counts%,}" 2>&1 | grep -E '^\{|Error' ;;
        train-scale) python bench/train_scale.py --ranks "${counts%,}" 2>&1 | grep -E '^\{|Error' ;;
      esac ;;
    *) echo "unknown group $group (tests, rollout, train, profile, specrl, quant, fp8, onpolicy, int4, fp8train," \
         "scale-colocate, scale-disagg, train-scale)" >&2; exit 2 ;;
  esac
done
