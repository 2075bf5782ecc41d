# shellcheck shell=bash
# Sourced by container/build and container/test. Points buildah and podman at a private
# configuration under one directory, which then holds what they write (images, containers,
# their state; only containers/image's small blob-info cache still goes to
# /var/lib/containers/cache), so that a build or a test needs no set-up of the machine beyond
# Debian's packages and leaves no image or container behind:
# - storage on `vfs`: works on any filesystem, including the overlay a CI runner may sit on;
#   the image is one small layer, so nothing is gained from overlayfs;
# - `runc`: crun fails on cgroup v1 and hybrid hierarchies, which CI machines still have;
# - cgroupfs and file events: there may be no systemd to ask;
# - the containers' open-files and processes limits at the host's hard limit: podman's
#   default (1048576) cannot be granted where the hard limit is lower.

# Usage: use_private_container_config DIRECTORY
use_private_container_config() {
  local dir=$1 limit
  limit="$(ulimit -Hn)"
  mkdir -p "$dir/storage" "$dir/run" "$dir/tmp" "$dir/volumes" "$dir/networks"
  cat >"$dir/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$limit:$limit", "nproc=$limit:$limit"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$dir/events.log"
tmp_dir = "$dir/tmp"
static_dir = "$dir/libpod"
volume_path = "$dir/volumes"

[network]
network_config_dir = "$dir/networks"
CONF
  cat >"$dir/storage.conf" <<CONF
[storage]
driver = "vfs"
graphroot = "$dir/storage"
runroot = "$dir/run"
CONF
  export CONTAINERS_CONF="$dir/containers.conf"
  export CONTAINERS_STORAGE_CONF="$dir/storage.conf"
}
