# libdevmapper from Debian's lvm2 source package, installed under /usr/local (devicemapper graph driver).
apt-get -o Acquire::Retries=5 update
apt-get -o Acquire::Retries=5 install -y --no-install-recommends dpkg-dev gcc libc6-dev make pkg-config libaio-dev libblkid-dev
mkdir -p /usr/src/lvm2 && cd /usr/src/lvm2
apt-get -o Acquire::Retries=5 source --download-only lvm2
dpkg-source -x lvm2_*.dsc src
cd src
./configure --prefix=/usr/local --disable-selinux --disable-udev_sync --disable-readline
make -j"$(nproc)" device-mapper
make install_device-mapper
ldconfig
cd / && rm -rf /usr/src/lvm2
