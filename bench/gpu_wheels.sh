#!/usr/bin/env bash
# Wheels that the GPU machines' image lacks and guardrail imports (PyAV; pydantic and its
# dependencies), for their Python 3.12 on x86-64. Run once here; then carry `.whl` with the
# device call (bench/README.md). `.whl/` is kept out of git through .git/info/exclude.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
"$PIP" download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    av==18.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing-extensions==4.16.0
du -sh .whl
