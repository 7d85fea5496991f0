/* A small deterministic program for CRIU to checkpoint in tests and the demo.
 *
 * usage: victim INFO_PATH [--seed S] [--tree N] [--threads N] [--shm] [--mib N] [--vmas M] [--holes K]
 *               [--private-memfd] [--zombie]
 *
 * It fills memory with a pattern that depends only on (seed, region, page, word), leaves
 * some pages untouched (holes), writes a private file mapping, places a secret across a page
 * boundary that is also a pagemap-entry boundary, and optionally forks children, starts
 * threads, and shares memory (anonymous shared, memfd, SysV). --private-memfd maps a memfd full
 * of 'S' MAP_PRIVATE and writes "PRIVATE-COPY" into the mapping (copy-on-write: the process's
 * page differs from the memfd's); --zombie leaves an exited child unreaped. When ready it writes a JSON
 * description to INFO_PATH (via a temporary name) and sleeps. On SIGUSR1 it checks every
 * pattern and writes "OK" or "BAD ..." to INFO_PATH.check.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096UL
#define MAX_REGIONS 4096

struct region { char name[48]; uintptr_t start; size_t len; unsigned id; int hole_every; };
static struct region regions[MAX_REGIONS];
static int nregions;
static unsigned long seed = 1;
static const char *info_path;
static char secret[96];
static uintptr_t secret_addr;
static uintptr_t pmemfd_addr; /* --private-memfd: the private mapping */
static pid_t zombie_pid;       /* --zombie: the unreaped child */

static uint64_t word(unsigned id, size_t page, size_t w)
{
	uint64_t x = seed * 0x9E3779B97F4A7C15ULL ^ ((uint64_t)id << 40) ^ ((uint64_t)page << 12) ^ w;
	x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
	return x;
}

static int is_hole(struct region *r, size_t page)
{
	return r->hole_every && page % r->hole_every == (size_t)r->hole_every - 2;
}

static void fill(struct region *r)
{
	for (size_t p = 0; p < r->len / PAGE; p++) {
		if (is_hole(r, p))
			continue;
		uint64_t *q = (uint64_t *)(r->start + p * PAGE);
		for (size_t w = 0; w < PAGE / 8; w++)
			q[w] = word(r->id, p, w);
	}
}

static int check(struct region *r, char *why, size_t n)
{
	for (size_t p = 0; p < r->len / PAGE; p++) {
		uint64_t *q = (uint64_t *)(r->start + p * PAGE);
		for (size_t w = 0; w < PAGE / 8; w++) {
			uint64_t want = is_hole(r, p) ? 0 : word(r->id, p, w);
			uintptr_t a = (uintptr_t)&q[w];
			if (a + 8 > secret_addr && a < secret_addr + strlen(secret))
				continue; /* the secret (checked on its own) overwrote these bytes */
			if (q[w] != want) {
				snprintf(why, n, "BAD %s page %zu word %zu", r->name, p, w);
				return 0;
			}
		}
	}
	return 1;
}

static struct region *add(const char *name, void *start, size_t len, int hole_every)
{
	if (nregions >= MAX_REGIONS) { fprintf(stderr, "too many regions\n"); exit(1); }
	struct region *r = &regions[nregions];
	snprintf(r->name, sizeof(r->name), "%s", name);
	r->start = (uintptr_t)start; r->len = len; r->id = nregions + 1; r->hole_every = hole_every;
	nregions++;
	return r;
}

static void *map_anon(size_t len, int shared)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) { perror("mmap"); exit(1); }
	return p;
}

static volatile sig_atomic_t want_check;
static void on_usr1(int sig) { (void)sig; want_check = 1; }

static void write_check(void)
{
	char path[4096], why[256] = "OK";
	int ok = 1;
	for (int i = 0; i < nregions && ok; i++)
		ok = check(&regions[i], why, sizeof(why));
	if (ok && memcmp((void *)secret_addr, secret, strlen(secret)) != 0) {
		snprintf(why, sizeof(why), "BAD secret");
		ok = 0;
	}
	snprintf(path, sizeof(path), "%s.check", info_path);
	FILE *f = fopen(path, "w");
	if (f) { fprintf(f, "%s\n", why); fclose(f); }
}

static void *thread_main(void *arg)
{
	(void)arg;
	for (;;)
		pause();
	return NULL;
}

static void write_info(pid_t *children, int nchildren, pid_t *tids, int ntids)
{
	char tmp[4096];
	snprintf(tmp, sizeof(tmp), "%s.tmp", info_path);
	FILE *f = fopen(tmp, "w");
	if (!f) { perror("info"); exit(1); }
	fprintf(f, "{\"pid\": %d, \"seed\": %lu, \"page_size\": %lu,\n \"secret\": {\"addr\": %lu, \"text\": \"%s\"},\n",
		getpid(), seed, PAGE, (unsigned long)secret_addr, secret);
	fprintf(f, " \"private_memfd\": %lu, \"zombie\": %d,\n", (unsigned long)pmemfd_addr, (int)zombie_pid);
	fprintf(f, " \"children\": [");
	for (int i = 0; i < nchildren; i++) fprintf(f, "%s%d", i ? ", " : "", children[i]);
	fprintf(f, "],\n \"threads\": [");
	for (int i = 0; i < ntids; i++) fprintf(f, "%s%d", i ? ", " : "", tids[i]);
	fprintf(f, "],\n \"regions\": [\n");
	for (int i = 0; i < nregions; i++)
		fprintf(f, "  {\"name\": \"%s\", \"start\": %lu, \"len\": %zu, \"id\": %u, \"hole_every\": %d}%s\n",
			regions[i].name, (unsigned long)regions[i].start, regions[i].len, regions[i].id,
			regions[i].hole_every, i + 1 < nregions ? "," : "");
	fprintf(f, " ]}\n");
	fclose(f);
	rename(tmp, info_path);
}

static void child_info(int index)
{
	char path[4096], tmp[4200];
	snprintf(path, sizeof(path), "%s.child%d", info_path, index);
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	FILE *f = fopen(tmp, "w");
	if (!f) exit(1);
	fprintf(f, "{\"pid\": %d, \"regions\": [", getpid());
	for (int i = 0; i < nregions; i++)
		fprintf(f, "%s{\"name\": \"%s\", \"start\": %lu, \"len\": %zu, \"id\": %u, \"hole_every\": %d}",
			i ? ", " : "", regions[i].name, (unsigned long)regions[i].start, regions[i].len, regions[i].id,
			regions[i].hole_every);
	fprintf(f, "]}\n");
	fclose(f);
	rename(tmp, path);
}

int main(int argc, char **argv)
{
	int tree = 0, threads = 0, shm = 0, mib = 0, vmas = 1, holes = 0, pmemfd = 0, zombie = 0;
	if (argc < 2) { fprintf(stderr, "usage: victim INFO_PATH [options]\n"); return 2; }
	info_path = argv[1];
	for (int i = 2; i < argc; i++) {
		if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = strtoul(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--tree") && i + 1 < argc) tree = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--mib") && i + 1 < argc) mib = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--vmas") && i + 1 < argc) vmas = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--holes") && i + 1 < argc) holes = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--shm")) shm = 1;
		else if (!strcmp(argv[i], "--private-memfd")) pmemfd = 1;
		else if (!strcmp(argv[i], "--zombie")) zombie = 1;
		else { fprintf(stderr, "victim: unknown option %s\n", argv[i]); return 2; }
	}
	signal(SIGUSR1, on_usr1);

	/* private anonymous memory with holes */
	fill(add("anon", map_anon(64 * PAGE, 0), 64 * PAGE, 5));
	/* heap */
	void *heap = malloc(200 * 1024);
	uintptr_t hs = ((uintptr_t)heap + PAGE - 1) & ~(PAGE - 1);
	fill(add("malloc", (void *)hs, 48 * PAGE, 0));

	/* a written private file mapping, then an anonymous page right after it: the secret
	 * spans the page boundary, which is also a pagemap-entry boundary (file pages are not lazy) */
	char fpath[4096];
	snprintf(fpath, sizeof(fpath), "%s.file", info_path);
	int fd = open(fpath, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || ftruncate(fd, 4 * PAGE)) { perror("file"); return 1; }
	char *area = mmap(NULL, 5 * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char *fmap = mmap(area, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, 0);
	char *after = mmap(area + 4 * PAGE, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	if (fmap == MAP_FAILED || after == MAP_FAILED) { perror("mmap fixed"); return 1; }
	close(fd);
	struct region *fr = add("file-private", fmap, 4 * PAGE, 2);
	fill(fr);
	snprintf(secret, sizeof(secret), "CRIT-PAGEREAD-SECRET-%lu-spans-two-pages", seed);
	secret_addr = (uintptr_t)after - 17;
	memcpy((void *)secret_addr, secret, strlen(secret));

	/* bulk memory for benchmarks: mib MiB over vmas mappings with gaps between them; with
	 * --holes K (K >= 2) one page in every K is left untouched, so the pagemap has K-1 page
	 * entries with holes between them (K = 2: single-page entries, every other page) */
	if (holes < 2) holes = 0;
	if (mib > 0) {
		size_t per = ((size_t)mib << 20) / vmas;
		per = (per + PAGE - 1) & ~(PAGE - 1);
		for (int v = 0; v < vmas; v++) {
			char *p = mmap(NULL, per + PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (p == MAP_FAILED) { perror("mmap bulk"); return 1; }
			munmap(p + per, PAGE); /* a gap, so neighbouring mappings do not merge */
			char name[48];
			snprintf(name, sizeof(name), "bulk%d", v);
			if (holes) madvise(p, per, MADV_NOHUGEPAGE); /* a huge page would fill the holes */
			fill(add(name, p, per, holes));
		}
	}

	if (shm) {
		fill(add("anon-shared", map_anon(16 * PAGE, 1), 16 * PAGE, 0));
		int mfd = memfd_create("victim-memfd", 0);
		if (mfd < 0 || ftruncate(mfd, 8 * PAGE)) { perror("memfd"); return 1; }
		void *m = mmap(NULL, 8 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
		if (m == MAP_FAILED) { perror("mmap memfd"); return 1; }
		fill(add("memfd", m, 8 * PAGE, 0));
		int id = shmget(IPC_PRIVATE, 4 * PAGE, IPC_CREAT | 0600);
		void *s = id < 0 ? (void *)-1 : shmat(id, NULL, 0);
		if (s == (void *)-1) { perror("shm"); return 1; }
		fill(add("sysv-shm", s, 4 * PAGE, 0));
	}

	if (pmemfd) {
		/* 4 pages of 'S' in a memfd, mapped privately; page 1 then gets a private copy */
		int pfd = memfd_create("victim-private-memfd", 0);
		char page[PAGE];
		memset(page, 'S', PAGE);
		for (int p = 0; p < 4; p++)
			if (pfd < 0 || write(pfd, page, PAGE) != (ssize_t)PAGE) { perror("private memfd"); return 1; }
		char *pm = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, pfd, 0);
		if (pm == MAP_FAILED) { perror("mmap private memfd"); return 1; }
		volatile char sink = pm[0] + pm[2 * PAGE] + pm[3 * PAGE]; /* fault the shared pages in */
		(void)sink;
		memcpy(pm + PAGE + 100, "PRIVATE-COPY", 12);
		pmemfd_addr = (uintptr_t)pm;
	}
	if (zombie) {
		zombie_pid = fork();
		if (zombie_pid < 0) { perror("fork zombie"); return 1; }
		if (zombie_pid == 0) _exit(7);
		for (;;) { /* until it has exited (a zombie: state Z, still unreaped) */
			char st[64], buf[512];
			snprintf(st, sizeof(st), "/proc/%d/stat", (int)zombie_pid);
			FILE *zf = fopen(st, "r");
			if (!zf) break;
			size_t n = fread(buf, 1, sizeof(buf) - 1, zf);
			fclose(zf);
			buf[n] = 0;
			char *rp = strrchr(buf, ')');
			if (rp && rp[1] == ' ' && rp[2] == 'Z') break;
			usleep(1000);
		}
	}

	pid_t children[64];
	int nchildren = 0;
	for (int c = 0; c < tree && c < 64; c++) {
		pid_t pid = fork();
		if (pid < 0) { perror("fork"); return 1; }
		if (pid == 0) {
			seed = seed * 1000 + c + 1;
			nregions = 0;
			fill(add("child-anon", map_anon((16 + 8 * c) * PAGE, 0), (16 + 8 * c) * PAGE, 4));
			child_info(c);
			for (;;) {
				pause();
			}
		}
		children[nchildren++] = pid;
	}
	pid_t tids[64];
	int ntids = 0;
	tids[ntids++] = (pid_t)syscall(SYS_gettid);
	for (int t = 0; t < threads && t < 63; t++) {
		pthread_t th;
		if (pthread_create(&th, NULL, thread_main, NULL)) { perror("pthread"); return 1; }
	}
	if (threads > 0) {
		/* list our threads from /proc so the info has their tids */
		usleep(100000);
		ntids = 0;
		DIR *d = opendir("/proc/self/task");
		struct dirent *de;
		while (d && ntids < 64 && (de = readdir(d)))
			if (de->d_name[0] != '.')
				tids[ntids++] = atoi(de->d_name);
		if (d)
			closedir(d);
	}
	write_info(children, nchildren, tids, ntids);
	for (;;) {
		pause();
		if (want_check) {
			want_check = 0;
			write_check();
		}
	}
}
