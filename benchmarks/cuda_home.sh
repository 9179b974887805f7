# Sourced by gpu_check.sh and device_env_check.sh: export CUDA_HOME when it is unset.
#
# torch guesses CUDA_HOME from the folder `nvcc` is in. That guess is wrong when `nvcc` is a wrapper
# script in /usr/local/bin (as on the CPU VMs this project is developed on): CUDA_HOME becomes
# /usr/local, which has no CUDA headers, and the extension build dies in ninja on
# "cuda_runtime.h: No such file". Pick the first candidate root that has the headers.
if [[ -z "${CUDA_HOME:-}" ]]; then
    _nvcc_root=$(dirname "$(dirname "$(command -v nvcc || echo /none/bin/nvcc)")")
    for _root in "$_nvcc_root" /usr/local/cuda /usr/local/cuda-*; do
        if [[ -f "$_root/include/cuda_runtime.h" ]]; then
            export CUDA_HOME=$_root
            break
        fi
    done
    unset _nvcc_root _root
fi
