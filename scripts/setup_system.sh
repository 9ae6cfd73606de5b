#!/usr/bin/env bash
# System packages the project needs: a Java runtime for TextWorldExpress's engine, MariaDB for InterCode-SQL.
set -euo pipefail
if ! command -v java >/dev/null 2>&1; then
  echo "Installing a Java runtime (TextWorldExpress runs on the JVM)"
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q default-jre-headless
fi
# MariaDB for the InterCode-SQL env: the project runs a private server (ipr_core/envs/sql_server.py);
# the packaged service is kept from starting during the install where no policy says so.
if ! { command -v mariadbd || test -x /usr/sbin/mariadbd; } >/dev/null 2>&1 \
  || ! command -v mariadb >/dev/null 2>&1 || ! command -v mariadb-install-db >/dev/null 2>&1; then
  echo "Installing MariaDB (the InterCode-SQL env starts its own private server)"
  added_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    added_policy=1
  fi
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends mariadb-server mariadb-client
  if [ -n "$added_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
