# runtime-dev: the C libraries the daemon links (Docker's Dockerfile, stage runtime-dev, without the cross tools).
apt-get -o Acquire::Retries=5 update
apt-get -o Acquire::Retries=5 install -y --no-install-recommends libapparmor-dev libbtrfs-dev libdevmapper-dev libseccomp-dev libsystemd-dev libudev-dev
