# Source on the GPU machine, from the repository root, before running anything there:
#   . benchmarks/device_env.sh && python3 benchmarks/gpu.py
# Installs the wheels carried in .whl (fetched here by ../shared/tools/gpu-wheels.sh; name .whl in
# carry) and makes the source tree importable without `pip install` (models/ is installed as
# sgl_compile.models, so it gets linked there).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
[ -e sgl_compile/models ] || ln -s ../models sgl_compile/models
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
