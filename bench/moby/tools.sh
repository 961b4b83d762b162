# tools: developer tools on top of the toolchain, as the Dockerfile's tool stages (gotestsum, go-md2man, shfmt).
apt-get -o Acquire::Retries=5 update
apt-get -o Acquire::Retries=5 install -y --no-install-recommends gotestsum go-md2man shfmt@EXTRA@
