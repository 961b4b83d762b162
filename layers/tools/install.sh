apt-get update
apt-get install -y --no-install-recommends go-md2man golint
go-md2man -version || true
