# Sourced by scripts/test.sh: the services the suite needs beyond Python, started the same way here and in CI.
#   start_postgres   a PostgreSQL server on loopback for the store tests ($LLMPLAN_TEST_POSTGRES_URL), stopped on exit
#   find_browser     Debian's chromium and chromedriver for the dashboard's browser test
# Missing software is installed with apt-get where this shell can (root, apt-get present). Where it cannot, a line
# says what to install and the tests that need it skip; with $CI set those tests fail instead (tests/ci_required.py).

apt_updated=""
can_apt() {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null
}

apt_install() {
    if [ -z "$apt_updated" ]; then
        apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Install Debian packages "$@" when this shell can; 1 when it cannot.
install_packages() {
    if can_apt; then
        apt_install "$@"
    else
        return 1
    fi
}

postgres_bin() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

# A command run as the server's owner: postgres refuses to run as root, so root runs it as the postgres user.
as_postgres_owner() {
    if [ "$(id -u)" = 0 ]; then
        (cd / && su postgres -c "$1")  # from /: the postgres user may not read the checkout
    else
        sh -c "$1"
    fi
}

start_postgres() {
    local bin data port
    bin=$(postgres_bin)
    if [ -z "$bin" ] && install_packages postgresql; then
        bin=$(postgres_bin)
    fi
    if [ -z "$bin" ]; then
        echo "scripts/test.sh: no PostgreSQL server (initdb) here: the PostgreSQL store tests will skip" \
             "(apt-get install postgresql, or run as root to have it installed)" >&2
        return 0
    fi
    data=$(mktemp -d /tmp/llmplan-pg.XXXXXX)
    # A free loopback port, so a server left over from another run cannot collide with this one.
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    [ "$(id -u)" = 0 ] && chown postgres "$data"
    # initdb has no -q; -N skips fsync of the fresh cluster.
    as_postgres_owner "$bin/initdb -N -D $data -A trust -U postgres" >/dev/null
    if ! as_postgres_owner "$bin/pg_ctl -D $data -l $data/server.log -w -t 60 -o '-c listen_addresses=127.0.0.1 -p $port -k $data' start" >/dev/null; then
        cat "$data/server.log" >&2
        return 1
    fi
    export LLMPLAN_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:$port/postgres"
    trap "as_postgres_owner '$bin/pg_ctl -D $data -m fast stop' >/dev/null 2>&1; rm -rf '$data' || true" EXIT
    echo "PostgreSQL for the store tests: 127.0.0.1:$port" >&2
}

# tests/runtime/web/test_dashboard.py drives the dashboard in headless chromium through chromedriver.
find_browser() {
    if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
        return 0
    fi
    if ! install_packages chromium chromium-driver; then
        echo "scripts/test.sh: no chromium and chromedriver here: the dashboard's browser test will skip" \
             "(apt-get install chromium chromium-driver, or run as root to have them installed)" >&2
    fi
}
