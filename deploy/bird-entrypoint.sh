#!/bin/sh
# Entrypoint of the bird worker image (deploy/Dockerfile).
#
# `bird worker` drives Ray from inside the cluster: when BIRD_RAY_ADDRESS is a GCS address
# (host:6379), the container first joins the cluster as a node with no CPUs and no GPUs (so no
# training is scheduled on it), because ray.init(address=...) needs a raylet on its own node.
# With ray://host:10001 (Ray Client) nothing is joined. Other commands run unchanged.
set -eu
if [ "${1:-}" = "bird" ] && [ "${2:-}" = "worker" ]; then
    case "${BIRD_RAY_ADDRESS:-}" in
        "" | auto | local | ray://*) ;;
        *) ray start --address="${BIRD_RAY_ADDRESS}" --num-cpus=0 --num-gpus=0 --disable-usage-stats ;;
    esac
fi
exec "$@"
