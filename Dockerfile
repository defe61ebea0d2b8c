# streamrelay in a container: the relay alone (no PyAV), run by its console script in
# the foreground.  See docs/operations.md, "Containers".
#   docker build -t streamrelay .
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9100:9100 \
#       -e STREAMRELAY_PUBLISH_SECRET=... streamrelay

FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY streamrelay ./streamrelay
COPY twisted ./twisted
# The relay's wheel and every dependency's, to install in the final image without a
# compiler or the sources.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
COPY --from=build /wheels /wheels
# Installing from the wheelhouse alone: the versions are the ones the build resolved.
# The twistd plugin cache is written now, while the site-packages are writable.
RUN pip install --no-cache-dir --no-index --find-links=/wheels /wheels/streamrelay-*.whl \
    && rm -rf /wheels \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && groupadd --system --gid 10001 streamrelay \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --shell /usr/sbin/nologin streamrelay
USER 10001:10001
EXPOSE 8080 9100
# SIGTERM drains: new handshakes get 503, connections 1001, then exit status 0.  Give
# `docker stop` more than --close-timeout (2 s): its default 10 s is enough.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["streamrelay"]
# /metrics on its own port (publish it only to the monitoring network), JSON logs on
# standard output.
CMD ["--listen", "tcp:8080", "--metrics-listen", "tcp:9100", "--json-logs"]
