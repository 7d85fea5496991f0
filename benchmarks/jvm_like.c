/* A JVM-like process for the benchmarks: a huge reserved heap of which a few hundred scattered
 * regions are in use, as a Java heap after some collections.
 *
 * usage: jvm_like INFO_PATH [--heap-gib G] [--clusters C] [--pages P] [--seed S]
 *
 * Reserves G GiB (MAP_NORESERVE, no huge pages), writes C clusters of P pages each at spread,
 * jittered places (so the pagemap has about C entries there and many pages not dumped between
 * them), puts the benchmarks' secret literal in one cluster, writes {"pid", "children", "secret"}
 * to INFO_PATH (through a temporary name) and sleeps.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL

static uint64_t rng_state = 7;

static uint64_t next(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

int main(int argc, char **argv)
{
	unsigned long gib = 8, clusters = 200, pages = 350, seed = 7;
	if (argc < 2) { fprintf(stderr, "usage: jvm_like INFO_PATH [options]\n"); return 2; }
	for (int i = 2; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "--heap-gib")) gib = strtoul(argv[i + 1], NULL, 0);
		else if (!strcmp(argv[i], "--clusters")) clusters = strtoul(argv[i + 1], NULL, 0);
		else if (!strcmp(argv[i], "--pages")) pages = strtoul(argv[i + 1], NULL, 0);
		else if (!strcmp(argv[i], "--seed")) seed = strtoul(argv[i + 1], NULL, 0);
		else { fprintf(stderr, "jvm_like: unknown option %s\n", argv[i]); return 2; }
	}
	rng_state = seed * 2654435761UL + 1;
	size_t heap_len = gib << 30;
	char *heap = mmap(NULL, heap_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (heap == MAP_FAILED) { perror("mmap heap"); return 1; }
	madvise(heap, heap_len, MADV_NOHUGEPAGE);
	size_t slot = heap_len / clusters;
	char secret[64];
	snprintf(secret, sizeof(secret), "CRIT-PAGEREAD-SECRET-%lu-spans", seed);
	char *secret_at = NULL;
	for (unsigned long c = 0; c < clusters; c++) {
		size_t room = slot - pages * PAGE - PAGE;
		size_t jitter = (next() % (room / PAGE)) * PAGE;
		char *p = heap + c * slot + jitter;
		for (unsigned long k = 0; k < pages; k++) {
			uint64_t *w = (uint64_t *)(p + k * PAGE);
			for (size_t j = 0; j < PAGE / 8; j++)
				w[j] = next();
		}
		if (c == clusters / 2) {
			secret_at = p + 17 * PAGE - 9; /* across a page boundary */
			memcpy(secret_at, secret, strlen(secret));
		}
	}
	char tmp[4096];
	snprintf(tmp, sizeof(tmp), "%s.tmp", argv[1]);
	FILE *f = fopen(tmp, "w");
	if (!f) { perror("info"); return 1; }
	fprintf(f, "{\"pid\": %d, \"children\": [], \"heap\": [%lu, %lu],\n \"secret\": {\"addr\": %lu, \"text\": \"%s\"}}\n",
		getpid(), (unsigned long)heap, (unsigned long)heap_len, (unsigned long)secret_at, secret);
	fclose(f);
	rename(tmp, argv[1]);
	for (;;)
		pause();
}
