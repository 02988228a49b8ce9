// C library functions the host needs that Swift's Glibc module does not expose.
#define _GNU_SOURCE
#include <string.h>
#include "gatehouse_support.h"

const void *gatehouse_memmem(const void *haystack, size_t haystack_length, const void *needle, size_t needle_length) {
    return memmem(haystack, haystack_length, needle, needle_length);
}
