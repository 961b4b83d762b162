// devmapper-version prints the version of the libdevmapper it is linked against, through cgo,
// the way Docker's devicemapper graph driver calls lvm2's library.
package main

/*
#cgo LDFLAGS: -ldevmapper
#include <libdevmapper.h>
#include <stdlib.h>

static int lib_version(char *buf, size_t len) { return dm_get_library_version(buf, len); }
*/
import "C"

import (
	"fmt"
	"os"
	"unsafe"
)

func main() {
	buf := (*C.char)(C.malloc(128))
	defer C.free(unsafe.Pointer(buf))
	if C.lib_version(buf, 128) == 0 {
		fmt.Fprintln(os.Stderr, "dm_get_library_version failed")
		os.Exit(1)
	}
	fmt.Printf("libdevmapper %s\n", C.GoString(buf))
}
