# poolwatch, the always-on image-dataset curator, as a container (README.md, "Container").
#
#   docker build -t poolwatch .
#   docker run -d --name poolwatch -v INPUT_DIR:/home/input_dir:ro -v OUTPUT_DIR:/home/shared_dir \
#       --ipc=host -p 9464:9464 poolwatch lightly.loader.num_workers=8
#
# Trailing key=value arguments are appended to `poolwatch run input_dir=/home/input_dir
# shared_dir=/home/shared_dir metrics.host=0.0.0.0` (ENTRYPOINT + empty CMD), as in Lightly's seed container.
#
# One stage: every dependency is a prebuilt wheel (no compilers to leave behind), so a builder stage would
# only copy the same ~6 GB virtual environment across (twice the disk and minutes longer to build);
# --no-cache-dir keeps pip's download cache out of the image.
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

# uid/gid 1000: the usual first user of a Linux host, so that a shared dir that user made is writable as it
# is; anyone else: `--user "$(id -u):$(id -g)"` or a chown of the shared dir (README).
ARG UID=1000
ARG GID=1000
RUN groupadd --gid "${GID}" poolwatch \
    && useradd --uid "${UID}" --gid "${GID}" --create-home --home-dir /home/poolwatch --shell /usr/sbin/nologin poolwatch \
    && mkdir -p /home/input_dir /home/shared_dir \
    && chown "${UID}:${GID}" /home/shared_dir \
    && python -m venv /opt/venv

WORKDIR /src
# Dependencies first, from pyproject.toml + constraints.txt alone, so that a change to the code does not
# download torch again. torch/torchvision are PyPI's default (CUDA) wheels: CPU here, GPUs with --gpus all.
# EXTRAS: pyproject's optional dependencies to add, comma-separated: postgres (a shared store, the default),
# ray (`poolwatch ingest --ray`, a Ray node): `docker build --build-arg EXTRAS=postgres,ray -t poolwatch:ray .`
ARG EXTRAS=postgres
COPY pyproject.toml constraints.txt ./
RUN python -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; x = [e for e in os.environ['EXTRAS'].split(',') if e]; print('\n'.join(p['dependencies'] + [d for e in x for d in p['optional-dependencies'][e]]))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY README.md config.yaml ./
COPY poolwatch_pkg/ poolwatch_pkg/
COPY pipeline/ pipeline/
COPY daemon/ daemon/
RUN pip install --no-cache-dir --no-deps -c constraints.txt . \
    && rm -rf /src/build /src/*.egg-info \
    && poolwatch --version

USER ${UID}:${GID}
WORKDIR /home/poolwatch
VOLUME ["/home/input_dir", "/home/shared_dir"]
# Prometheus /metrics and /healthz (bound to 0.0.0.0 below, so that a published port reaches them).
EXPOSE 9464
# poolwatch runs as PID 1 and handles SIGTERM itself (finish the batch and a running sampling run within
# graceful_timeout = 30 s, exit 0), SIGUSR1 (a sampling run) and SIGHUP (reload): no init process needed.
# Give `docker stop` more than graceful_timeout: `docker stop -t 40` (or `docker run --stop-timeout 40`).
STOPSIGNAL SIGTERM
# GET /healthz on the address the daemon really serves: metrics.host/metrics.port from PID 1's own arguments
# (and from its --config file), so `docker run IMAGE metrics.port=9500` stays healthy. Plain python, no curl;
# it does not import poolwatch (that would import torch: seconds of CPU every interval).
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u, yaml; a = open('/proc/1/cmdline', 'rb').read().decode().split(chr(0)); f = [v[9:] for v in a if v.startswith('--config=')] + [a[i + 1] for i, v in enumerate(a[:-1]) if v == '--config']; m = {'host': '127.0.0.1', 'port': 9464}; m.update(((yaml.safe_load(open(os.path.join('/proc/1/cwd', f[-1]))) or {}).get('metrics') or {}) if f else {}); m.update((k[8:], v.strip(chr(34) + chr(39))) for k, v in (x.split('=', 1) for x in a if x.startswith('metrics.') and '=' in x)); h = str(m['host']); h = '127.0.0.1' if h in ('0.0.0.0', '::', '') else h; u.urlopen('http://%s:%s/healthz' % (h, m['port']), timeout=8)"]
ENTRYPOINT ["poolwatch", "run", "input_dir=/home/input_dir", "shared_dir=/home/shared_dir", "metrics.host=0.0.0.0"]
CMD []
