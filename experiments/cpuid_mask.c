/* An AVX2-only CPU at native speed, for measurement: an LD_PRELOAD library that makes this process's CPUID
 * instruction report no AVX-512, no VNNI (AVX-512 or AVX), no BF16/FP16 extensions and no AMX, so that ONNX
 * Runtime (MLAS), OpenVINO and torch (oneDNN) pick the kernels they run on an AVX2-only CPU such as AMD Zen3.
 *
 * How: Linux "CPUID faulting" (arch_prctl(ARCH_SET_CPUID, 0); /proc/cpuinfo flag cpuid_fault) turns every CPUID
 * into a SIGSEGV. Our handler recognises the instruction (0F A2), runs the real CPUID with faulting briefly off,
 * clears the masked feature bits and steps over it. The setting is per thread, inherited by threads and forks, and
 * reset on execve; the constructor runs again in every new program because LD_PRELOAD is inherited. The code the
 * runtimes then execute is the real AVX2 code path on the real core: speeds are native, not emulated (unlike
 * `qemu-x86_64 -cpu Haswell`). What it does NOT change: the core itself (caches, ports, clocks of this CPU, not of
 * a Zen3), /proc/cpuinfo, and code that chose its path before this library loaded (glibc's string functions).
 *
 * SIGSEGV handlers installed later (Python's faulthandler, for instance) are kept and called for every other
 * SIGSEGV: sigaction()/signal() for SIGSEGV are interposed. Without CPUID faulting the library refuses to run the
 * program (exit 97) rather than let a measurement silently see the unmasked CPU.
 *
 * Environment: DITDEPLOY_CPUID_MASK_STATS=1 prints the number of CPUID instructions emulated at exit.
 * Build: gcc -O2 -shared -fPIC -o cpuid_mask.so cpuid_mask.c -ldl   (experiments/cpu_mask.py does it.)
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#ifndef ARCH_SET_CPUID
#define ARCH_SET_CPUID 0x1012
#endif

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);

static struct sigaction chained;         /* the SIGSEGV handler the program believes it installed */
static int installed;                    /* our handler is in place */
static volatile unsigned long emulated;  /* CPUID instructions answered */

static sigaction_fn real_sigaction(void) {
    static sigaction_fn fn;
    if (!fn) fn = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    return fn;
}

static long set_cpuid(int on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on); }

/* Feature bits an AVX2-only CPU (AMD Zen3) does not have. Leaf 7.0: EBX AVX512F(16) DQ(17) IFMA(21) PF(26) ER(27)
 * CD(28) BW(30) VL(31); ECX VBMI(1) VBMI2(6) VNNI(11) BITALG(12) VPOPCNTDQ(14); EDX 4VNNIW(2) 4FMAPS(3)
 * VP2INTERSECT(8) AMX-BF16(22) AVX512-FP16(23) AMX-TILE(24) AMX-INT8(25). Leaf 7.1: EAX AVX-VNNI(4) AVX512-BF16(5)
 * AMX-FP16(21) AVX-IFMA(23); EDX AVX-VNNI-INT8(4) AVX-NE-CONVERT(5) AMX-COMPLEX(8) AVX-VNNI-INT16(10) AVX10(19).
 * Leaf 0xD.0 EAX: the opmask/ZMM (5-7) and AMX tile (17-18) state components. Leaves 0x1D, 0x1E (AMX) and 0x24
 * (AVX10) read as zero. */
static void mask(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    enum { A, B, C, D };
    if (leaf == 7 && sub == 0) {
        r[B] &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31));
        r[C] &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        r[D] &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        r[A] &= ~((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23));
        r[D] &= ~((1u << 4) | (1u << 5) | (1u << 8) | (1u << 10) | (1u << 19));
    } else if (leaf == 0xD && sub == 0) {
        r[A] &= ~((1u << 5) | (1u << 6) | (1u << 7) | (1u << 17) | (1u << 18));
    } else if (leaf == 0x1D || leaf == 0x1E || leaf == 0x24) {
        r[A] = r[B] = r[C] = r[D] = 0;
    }
}

static void chain(int sig, siginfo_t *info, void *ctx) {
    if (chained.sa_flags & SA_SIGINFO) {
        if (chained.sa_sigaction) { chained.sa_sigaction(sig, info, ctx); return; }
    } else if (chained.sa_handler != SIG_DFL && chained.sa_handler != SIG_IGN && chained.sa_handler) {
        chained.sa_handler(sig);
        return;
    }
    /* No handler of the program's: the default action (re-raised when the faulting instruction runs again). */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    real_sigaction()(SIGSEGV, &dfl, NULL);
}

static void on_segv(int sig, siginfo_t *info, void *ctx) {
    ucontext_t *uc = (ucontext_t *)ctx;
    greg_t *g = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)g[REG_RIP];
    if (info->si_code != SI_KERNEL || ip[0] != 0x0F || ip[1] != 0xA2) {
        chain(sig, info, ctx);
        return;
    }
    uint32_t leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX], r[4];
    set_cpuid(1);
    __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
    set_cpuid(0);
    mask(leaf, sub, r);
    g[REG_RAX] = r[0];
    g[REG_RBX] = r[1];
    g[REG_RCX] = r[2];
    g[REG_RDX] = r[3];
    g[REG_RIP] += 2;
    emulated++;
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (sig != SIGSEGV || !installed) return real_sigaction()(sig, act, old);
    if (old) *old = chained;
    if (act) chained = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    sigemptyset(&act.sa_mask);
    act.sa_flags = SA_RESTART;
    if (sigaction(sig, &act, &old) != 0) return SIG_ERR;
    return old.sa_handler;
}

__attribute__((constructor)) static void start(void) {
    struct sigaction act;
    memset(&act, 0, sizeof act);
    act.sa_sigaction = on_segv;
    act.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&act.sa_mask);
    if (real_sigaction()(SIGSEGV, &act, &chained) != 0) {
        fputs("cpuid_mask: cannot install the SIGSEGV handler\n", stderr);
        _exit(97);
    }
    installed = 1;
    if (set_cpuid(0) != 0) {
        fputs("cpuid_mask: this kernel/CPU has no CPUID faulting (arch_prctl ARCH_SET_CPUID failed): refusing to run "
              "unmasked\n", stderr);
        _exit(97);
    }
}

__attribute__((destructor)) static void stop(void) {
    const char *s = getenv("DITDEPLOY_CPUID_MASK_STATS");
    if (s && *s == '1') fprintf(stderr, "cpuid_mask: %lu CPUID instructions answered (pid %d)\n", emulated, getpid());
}
