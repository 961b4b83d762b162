module example.com/devmapper-version

go 1.19
