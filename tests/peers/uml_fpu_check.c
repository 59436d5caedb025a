/*
 * Run inside User-Mode Linux (tests/peers/test_harness.py): do a guest's threads keep their own
 * vector registers across system calls, preemption and switches between them?
 *
 * UML runs all threads of a guest process in one host process and switches their registers with
 * ptrace (tests/peers/uml_xstate.c). Two threads, each with its own pattern, load it into the
 * widest register the CPU has (zmm31 with AVX-512F, else ymm15), then in each round make a
 * sched_yield system call (the other thread runs: UML switches the registers) and spin (UML's
 * timer may preempt), all in one asm block, and compare the register with the pattern.
 * Prints "FPU <register> threads=2 rounds=<n> mismatches=<m>" and exits 0 if m is 0.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define ROUNDS 3000
#define SPIN 20000L

static int wide;  /* 1: zmm31 (64 bytes), 0: ymm15 (32 bytes) */
static int mismatches[2];

static void round_trip(const uint64_t *in, uint64_t *out)
{
	/* sched_yield is system call 24 on x86-64 (arch/x86/entry/syscalls/syscall_64.tbl) */
	if (wide)
		__asm__ volatile("vmovdqu64 (%0), %%zmm31\n\t"
				 "mov $24, %%eax\n\tsyscall\n\t"
				 "mov %2, %%rdx\n1:\n\tdec %%rdx\n\tjnz 1b\n\t"
				 "vmovdqu64 %%zmm31, (%1)\n\t"
				 : : "r"(in), "r"(out), "r"(SPIN) : "rax", "rcx", "rdx", "r11", "memory");
	else
		__asm__ volatile("vmovdqu (%0), %%ymm15\n\t"
				 "mov $24, %%eax\n\tsyscall\n\t"
				 "mov %2, %%rdx\n1:\n\tdec %%rdx\n\tjnz 1b\n\t"
				 "vmovdqu %%ymm15, (%1)\n\t"
				 : : "r"(in), "r"(out), "r"(SPIN) : "rax", "rcx", "rdx", "r11", "memory");
}

static void *worker(void *arg)
{
	int id = (int)(intptr_t)arg;
	uint64_t in[8], out[8];
	for (int i = 0; i < 8; i++)
		in[i] = 0x0123456789abcdefULL * (uint64_t)(id + 1) + (uint64_t)i;
	for (int r = 0; r < ROUNDS; r++) {
		memset(out, 0, sizeof(out));
		round_trip(in, out);
		if (memcmp(in, out, wide ? 64 : 32) != 0)
			mismatches[id]++;
	}
	return NULL;
}

int main(void)
{
	__builtin_cpu_init();
	if (!__builtin_cpu_supports("avx")) {
		printf("FPU none: the CPU has no AVX\n");
		return 0;
	}
	wide = __builtin_cpu_supports("avx512f");
	pthread_t t[2];
	for (int i = 0; i < 2; i++)
		if (pthread_create(&t[i], NULL, worker, (void *)(intptr_t)i) != 0) {
			printf("FPU FAIL pthread_create\n");
			return 2;
		}
	for (int i = 0; i < 2; i++)
		pthread_join(t[i], NULL);
	int m = mismatches[0] + mismatches[1];
	printf("FPU %s threads=2 rounds=%d mismatches=%d\n", wide ? "zmm31" : "ymm15", ROUNDS, m);
	return m != 0;
}
