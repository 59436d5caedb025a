/*
 * LD_PRELOAD for linux.uml on x86-64 hosts whose XSAVE area is larger than UML's buffer.
 *
 * UML (Debian 12's user-mode-linux 6.1, arch/x86/um/os-Linux/registers.c) saves and restores each
 * guest process's FPU state with PTRACE_GETREGSET / PTRACE_SETREGSET of NT_X86_XSTATE into a
 * buffer of sizeof(struct _xstate): 832 bytes, the XSAVE area of a CPU with AVX and nothing more.
 * The host kernel takes PTRACE_SETREGSET of NT_X86_XSTATE only with the whole XSAVE area of the
 * host (Linux arch/x86/kernel/fpu/regset.c xstateregs_set: "A whole standard-format XSAVE buffer
 * is needed", else EFAULT). On a CPU with AVX-512 (2,696 bytes) or AMX (11,008) every guest
 * process then dies on its first system call: "userspace - ptrace set fp regs failed, errno = 14",
 * "Kernel panic - not syncing: Attempted to kill init!".
 *
 * Here ptrace() of NT_X86_XSTATE with a buffer shorter than the host's area goes through a whole
 * area kept per UML buffer (UML keeps one per guest thread): GETREGSET reads the whole area and
 * hands UML its first bytes; SETREGSET writes UML's bytes over the whole area last read into that
 * buffer, so the components beyond UML's buffer (AVX-512, AMX) keep the thread's own values. A
 * buffer never read (a new thread: UML copied its parent's bytes into it) gets the components
 * beyond UML's bytes in their initial state (their bits cleared from the header's XSTATE_BV).
 * Where the host's area fits UML's buffer (a CPU with AVX and no AVX-512) every call passes
 * through unchanged. tests/peers/harness.py builds this file and preloads it into linux.uml.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

#ifndef NT_X86_XSTATE
#define NT_X86_XSTATE 0x202
#endif

#define PROBE_SIZE (64 * 1024)  /* more than any XSAVE area (AMX: 11,008 bytes) */
#define XSTATE_BV_OFFSET 512    /* the XSAVE header follows the 512-byte legacy area */
#define SLOTS 1024              /* UML buffers remembered (one per live guest thread) */

typedef long (*ptrace_fn)(enum __ptrace_request, pid_t, void *, void *);

static ptrace_fn real_ptrace;
static size_t host_size;  /* the host's NT_X86_XSTATE size, learnt from the first GETREGSET */

struct slot {
	void *uml;        /* UML's buffer */
	unsigned char *area;  /* the whole area last read into it */
};
static struct slot slots[SLOTS];

static struct slot *slot_of(void *uml, int create)
{
	size_t i = ((uintptr_t)uml >> 4) % SLOTS;
	for (size_t n = 0; n < SLOTS; n++, i = (i + 1) % SLOTS) {
		if (slots[i].uml == uml)
			return &slots[i];
		if (slots[i].uml == NULL) {
			if (!create)
				return NULL;
			slots[i].area = malloc(host_size);
			if (slots[i].area == NULL)
				return NULL;
			slots[i].uml = uml;
			return &slots[i];
		}
	}
	static int warned;  /* full: the caller falls back to a scratch area, said once in UML's log */
	if (!warned) {
		warned = 1;
		fprintf(stderr, "uml_xstate: more than %d guest threads: the AVX-512/AMX state of new ones is not kept\n", SLOTS);
	}
	return NULL;
}

static long xstate(enum __ptrace_request req, pid_t pid, struct iovec *iov)
{
	static unsigned char scratch[PROBE_SIZE];
	size_t len = iov->iov_len;
	struct iovec whole;
	long ret;

	if (host_size == 0) {  /* the kernel trims iov_len to the size of its regset */
		whole.iov_base = scratch;
		whole.iov_len = sizeof(scratch);
		ret = real_ptrace(PTRACE_GETREGSET, pid, (void *)(uintptr_t)NT_X86_XSTATE, &whole);
		if (ret < 0)
			return ret;
		host_size = whole.iov_len;
	}
	if (len >= host_size)
		return real_ptrace(req, pid, (void *)(uintptr_t)NT_X86_XSTATE, iov);

	struct slot *s = slot_of(iov->iov_base, req == PTRACE_GETREGSET);
	whole.iov_len = host_size;
	if (req == PTRACE_GETREGSET) {
		whole.iov_base = s != NULL ? s->area : scratch;
		ret = real_ptrace(req, pid, (void *)(uintptr_t)NT_X86_XSTATE, &whole);
		if (ret < 0)
			return ret;
		memcpy(iov->iov_base, whole.iov_base, len);
		return ret;  /* iov_len stays UML's: what it asked for was filled */
	}
	whole.iov_base = s != NULL ? s->area : memset(scratch, 0, host_size);
	memcpy(whole.iov_base, iov->iov_base, len);
	if (s == NULL && len >= XSTATE_BV_OFFSET + 8) {  /* never read: the rest from its init state */
		uint64_t bv;
		memcpy(&bv, scratch + XSTATE_BV_OFFSET, sizeof(bv));
		bv &= len >= 832 ? 0x7 : 0x3;  /* x87, SSE, and AVX when UML's buffer holds it */
		memcpy(scratch + XSTATE_BV_OFFSET, &bv, sizeof(bv));
	}
	return real_ptrace(req, pid, (void *)(uintptr_t)NT_X86_XSTATE, &whole);
}

long ptrace(enum __ptrace_request req, ...)
{
	va_list ap;
	va_start(ap, req);
	pid_t pid = va_arg(ap, pid_t);
	void *addr = va_arg(ap, void *);
	void *data = va_arg(ap, void *);
	va_end(ap);
	if (real_ptrace == NULL)
		real_ptrace = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
	if ((req == PTRACE_GETREGSET || req == PTRACE_SETREGSET) && (uintptr_t)addr == NT_X86_XSTATE && data != NULL)
		return xstate(req, pid, data);
	return real_ptrace(req, pid, addr, data);
}
