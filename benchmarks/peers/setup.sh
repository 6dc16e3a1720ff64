#!/usr/bin/env bash
# Installs the peers Stardust is compared with: Ray, Dask distributed, and Celery with a
# Redis server (Debian's). A virtual environment in benchmarks/peers/.venv; nothing global
# but the redis-server package.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if ! command -v redis-server >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
python3 -m venv "$here/.venv"
"$here/.venv/bin/pip" install --quiet --disable-pip-version-check \
    "ray>=2.40,<3" "dask[distributed]" "celery[redis]>=5.4,<6"
"$here/.venv/bin/python" -c "import ray, dask, distributed, celery, redis; print('ray', ray.__version__, '· dask', dask.__version__, '· celery', celery.__version__)"
