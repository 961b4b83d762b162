# go: Debian's Go toolchain (golang-1.19) and what cgo and hack/make.sh need.
apt-get -o Acquire::Retries=5 update
apt-get -o Acquire::Retries=5 install -y --no-install-recommends golang-go gcc libc6-dev make pkg-config
go version
