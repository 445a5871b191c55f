# A local stand-in for the postgres image: Debian's PostgreSQL (15 in bookworm), with an
# entrypoint that honours the same POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB variables and
# data directory, so docker-compose.yml's postgres service runs it unchanged (pg_isready
# included). Built by scripts/compose_test.py; never pushed anywhere.
ARG DEBIAN_IMAGE=bird-local/debian:bookworm
FROM ${DEBIAN_IMAGE}
# No cluster at install time: the entrypoint creates it in the data volume on the first start.
RUN mkdir -p /etc/postgresql-common/createcluster.d \
    && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/no-main.conf \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
RUN chmod 0755 /usr/local/bin/postgres-entrypoint
STOPSIGNAL SIGINT
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint"]
CMD ["postgres"]
