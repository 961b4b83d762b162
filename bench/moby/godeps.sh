# godeps: the golang-*-dev packages of `apt-get build-dep docker.io` (Debian removed vendor/; GOPATH finds them
# under /usr/share/gocode), without the rest of the build-deps: the toolchain and C libraries are other layers.
apt-get -o Acquire::Retries=5 update
apt-get build-dep -s docker.io | awk '$1 == "Inst" && $2 ~ /^golang-.*-dev$/ { print $2 }' > /tmp/godeps
test -s /tmp/godeps
xargs apt-get -o Acquire::Retries=5 install -y --no-install-recommends < /tmp/godeps
