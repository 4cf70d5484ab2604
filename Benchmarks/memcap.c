// Emulates a machine with less memory, for any program alike (strun, llama-bench), without
// touching control groups: locks (mlock) all available memory but CAP bytes, so the kernel can
// give the program and the page cache together no more than about CAP, then runs the command and
// returns its exit status. What it leaves is printed before the command starts.
//
//   cc -O2 Benchmarks/memcap.c -o /tmp/memcap
//   /tmp/memcap 8GiB -- .build/release/strun bench MODEL.stpk --memory-budget 8GiB
//   /tmp/memcap 8GiB -- llama-bench -m MODEL.gguf        (its default mmap then pages within the cap)
//
// Needs root or a large RLIMIT_MEMLOCK. "Available" is /proc/meminfo's MemAvailable at the start;
// the kernel keeps its own reserves beyond that, so the program may see somewhat less than CAP.
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static long long available_bytes(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return -1;
    char line[256];
    long long kb = -1;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "MemAvailable: %lld kB", &kb) == 1) break;
    }
    fclose(f);
    return kb < 0 ? -1 : kb * 1024;
}

static long long parse_size(const char *text) {
    char *end;
    double v = strtod(text, &end);
    if (end == text || v <= 0) return -1;
    double scale = 1;
    if (!strcasecmp(end, "k") || !strcasecmp(end, "kib")) scale = 1024.0;
    else if (!strcasecmp(end, "m") || !strcasecmp(end, "mib")) scale = 1024.0 * 1024;
    else if (!strcasecmp(end, "g") || !strcasecmp(end, "gib")) scale = 1024.0 * 1024 * 1024;
    else if (!strcasecmp(end, "kb")) scale = 1e3;
    else if (!strcasecmp(end, "mb")) scale = 1e6;
    else if (!strcasecmp(end, "gb")) scale = 1e9;
    else if (*end) return -1;
    return (long long)(v * scale);
}

static void set_oom_score_adj(const char *value) {
    FILE *f = fopen("/proc/self/oom_score_adj", "w");
    if (!f) return;
    fputs(value, f);
    fclose(f);
}

int main(int argc, char **argv) {
    if (argc < 4 || strcmp(argv[2], "--") != 0) {
        fprintf(stderr, "usage: memcap CAP -- COMMAND [ARGS...]   (CAP like 8GiB, 6G, 4096MiB)\n");
        return 2;
    }
    const long long cap = parse_size(argv[1]);
    const long long before = available_bytes();
    if (cap <= 0 || before < 0) {
        fprintf(stderr, "memcap: cannot read the cap '%s' or /proc/meminfo\n", argv[1]);
        return 2;
    }
    long long lock = before - cap;
    if (lock < 0) lock = 0;
    const long long chunk = 256LL << 20;
    long long locked = 0;
    // In chunks, so a refusal leaves what was locked so far (reported).
    while (locked < lock) {
        const long long n = lock - locked < chunk ? lock - locked : chunk;
        void *p = mmap(NULL, (size_t)n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED || mlock(p, (size_t)n) != 0) {
            fprintf(stderr, "memcap: could lock only %.2f GiB of %.2f (%s); run as root or raise ulimit -l\n", locked / 1073741824.0,
                    lock / 1073741824.0, strerror(errno));
            return 1;
        }
        memset(p, 1, (size_t)n);
        madvise(p, (size_t)n, MADV_DONTFORK);  // the command's fork does not copy the mapping
        locked += n;
    }
    // Locking frees some memory the kernel can reclaim, so MemAvailable ends above the cap: top up
    // in small steps until it is within 16 MiB of it.
    long long after = available_bytes();
    for (int round = 0; round < 64 && after > cap + (16LL << 20); round++) {
        const long long n = after - cap < chunk ? after - cap : chunk;
        void *p = mmap(NULL, (size_t)n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED || mlock(p, (size_t)n) != 0) break;
        memset(p, 1, (size_t)n);
        madvise(p, (size_t)n, MADV_DONTFORK);
        locked += n;
        after = available_bytes();
    }
    fprintf(stderr, "memcap: locked %.2f GiB; MemAvailable %.2f GiB before, %.2f GiB left for the command (cap %.2f GiB)\n",
            locked / 1073741824.0, before / 1073741824.0, after / 1073741824.0, cap / 1073741824.0);
    fflush(stderr);
    // The kernel's OOM killer, should the cap be too small, must pick the command, never this
    // process: its death would free the locked memory and let the command run uncapped unseen.
    set_oom_score_adj("-1000");
    const pid_t child = fork();
    if (child == 0) {
        set_oom_score_adj("0");
        // The locked pages stay with this process (MADV_DONTFORK; locks are not inherited).
        execvp(argv[3], argv + 3);
        fprintf(stderr, "memcap: cannot run %s: %s\n", argv[3], strerror(errno));
        _exit(127);
    }
    int status = 0;
    waitpid(child, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
