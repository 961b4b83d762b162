# Go tools from Debian, in the place of the golint and go-md2man the Dockerfile installed.
apt-get -o Acquire::Retries=5 update
apt-get -o Acquire::Retries=5 install -y --no-install-recommends go-md2man golang-golang-x-tools
go-md2man -help >/dev/null 2>&1 || true
command -v goimports
