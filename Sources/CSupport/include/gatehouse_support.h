// C library functions the host needs that Swift's Glibc module does not expose.
#ifndef GATEHOUSE_SUPPORT_H
#define GATEHOUSE_SUPPORT_H
#include <stddef.h>

/// glibc's memmem (a GNU extension, so hidden from Swift's Glibc module): the first occurrence
/// of `needle` in `haystack`, or NULL.
const void *gatehouse_memmem(const void *haystack, size_t haystack_length, const void *needle, size_t needle_length);

#endif
