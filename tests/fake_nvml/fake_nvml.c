/*
 * A fake libnvidia-ml.so.1 for tests: the NVML C API subset pals-daemon uses, with the real signatures
 * (nvml.h), driven by a plain-text state file so that pynvml's real ctypes path runs without a GPU.
 *
 * State: the file named by $FAKE_NVML_STATE (captured at nvmlInit) is re-read under flock(LOCK_EX) on every
 * call and written back when a call changes it, so separate processes (a daemon subprocess and the test that
 * started it) see one machine. Format, one entry per line ('#' starts a comment):
 *     count <n>                              number of GPUs (indices 0..n-1)
 *     nonroot <0|1>                          1: every setter (power limit, locked clocks) gets NO_PERMISSION
 *     driver_version <string>                nvmlSystemGetDriverVersion's answer (default DEFAULT_DRIVER_VERSION)
 *     fail <function> <code> [times]         every call of <function> returns <code> (times > 0: that many
 *                                            calls, then the fault clears itself)
 *     gpu <i> <key> <value>                  keys: name uuid min_mw max_mw default_mw limit_mw
 *                                            external_limit_mw|none power_mw instant_power_mw|none energy_mj
 *                                            energy_step_mj sm_clock_mhz clock_event_reasons
 *                                            mem_clock_mhz min_sm_clock_mhz max_sm_clock_mhz clock_step_mhz
 *                                            app_clock_mhz locked_min_mhz|none locked_max_mhz|none
 *     gpu <i> fail <function> <code> [times] as above, for GPU i only
 *     delay <function> <ms>                  every call of <function> first sleeps <ms> (a slow or hung
 *                                            driver); the sleep holds no lock, so other GPUs' calls go on
 *     gpu <i> delay <function> <ms>          as above, for GPU i only (overrides a global delay)
 * Model: enforced limit = min(limit_mw, external_limit_mw); reported average power = min(power_mw, enforced)
 * and the SW-power-cap reason bit is added while power_mw > enforced; each energy read returns energy_mj and
 * then advances it by energy_step_mj. Clocks: sm_clock_mhz is the clock the GPU would run at unlocked; the
 * SM clock in force is it clamped into [locked_min_mhz, locked_max_mhz] while a lock is set, and the
 * applications-clocks-setting reason bit is added while that clamp changes it. Supported graphics clocks are
 * max_sm_clock_mhz down to min_sm_clock_mhz in clock_step_mhz steps at the one memory clock mem_clock_mhz;
 * max_sm_clock_mhz 0 (the default) means the GPU reports no clocks and refuses locks with NOT_SUPPORTED.
 *
 * Log: every setter, nvmlInitWithFlags and nvmlShutdown call appends one line to $FAKE_NVML_LOG (if set),
 * e.g. "nvmlDeviceSetPowerManagementLimit 0 250000 rc=0", "nvmlDeviceSetGpuLockedClocks 0 345 1410 rc=0",
 * "nvmlDeviceResetGpuLockedClocks 0 rc=0".
 *
 * It fails loudly: an unknown key, a malformed number or a missing required GPU key makes every call return
 * NVML_ERROR_UNKNOWN with a message on stderr; functions it does not model are absent (pynvml then raises
 * NVML_ERROR_FUNCTION_NOT_FOUND); clock types and field ids it does not model are NOT_SUPPORTED.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* nvmlReturn_t values (nvml.h). */
typedef int nvmlReturn_t;
#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_NO_PERMISSION 4
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_DRIVER_NOT_LOADED 9
#define NVML_ERROR_GPU_IS_LOST 15
#define NVML_ERROR_RESET_REQUIRED 16
#define NVML_ERROR_UNKNOWN 999

/* nvmlClockType_t NVML_CLOCK_GRAPHICS, NVML_CLOCK_SM, NVML_CLOCK_MEM (nvml.h). */
#define NVML_CLOCK_GRAPHICS 0
#define NVML_CLOCK_SM 1
#define NVML_CLOCK_MEM 2
/* nvmlClockId_t (nvml.h). */
#define NVML_CLOCK_ID_CURRENT 0
#define NVML_CLOCK_ID_APP_CLOCK_TARGET 1
#define NVML_CLOCK_ID_APP_CLOCK_DEFAULT 2
#define NVML_CLOCK_ID_CUSTOMER_BOOST_MAX 3
/* nvmlClocksEventReasonApplicationsClocksSetting 0x0000000000000002ULL (nvml.h). */
#define CLOCKS_EVENT_REASON_APPLICATIONS_CLOCKS 0x2ULL
/* Bound on the supported-graphics-clocks list the fake builds (a real H100 lists ~110). */
#define MAX_CLOCKS 512
/* nvmlValueType_t NVML_VALUE_TYPE_UNSIGNED_INT (nvml.h). */
#define NVML_VALUE_TYPE_UNSIGNED_INT 1
/* #define NVML_FI_DEV_POWER_INSTANT 186 (nvml.h). */
#define NVML_FI_DEV_POWER_INSTANT 186
/* nvmlClocksEventReasonSwPowerCap 0x0000000000000004ULL (nvml.h). */
#define CLOCKS_EVENT_REASON_SW_POWER_CAP 0x4ULL

typedef struct nvmlDevice_st {
    unsigned int index;
} *nvmlDevice_t;

/* nvmlValue_t and nvmlFieldValue_t as in nvml.h (and pynvml's c_nvmlFieldValue_t). */
typedef union {
    double dVal;
    unsigned int uiVal;
    unsigned long ulVal;
    unsigned long long ullVal;
    signed long long sllVal;
    signed int siVal;
    unsigned short usVal;
} nvmlValue_t;

typedef struct {
    unsigned int fieldId;
    unsigned int scopeId;
    long long timestamp;
    long long latencyUsec;
    int valueType;
    nvmlReturn_t nvmlReturn;
    nvmlValue_t value;
} nvmlFieldValue_t;

#define MAX_GPUS 16
#define MAX_FAULTS 64
#define MAX_DELAYS 32
#define TEXT_LEN 96
#define FILE_MAX 65536
#define NONE (-1LL)
/* The driver_version when the state names none: an R550 production driver's version string. */
#define DEFAULT_DRIVER_VERSION "550.54.15"

typedef struct {
    char fn[64];
    int gpu; /* -1: every GPU / global */
    int code;
    int times; /* 0: forever */
} fault_t;

typedef struct {
    char fn[64];
    int gpu; /* -1: global */
    long long ms;
} delay_t;

typedef struct {
    char name[TEXT_LEN];
    char uuid[TEXT_LEN];
    long long min_mw, max_mw, default_mw, limit_mw, external_limit_mw;
    long long power_mw, instant_power_mw;
    long long energy_mj, energy_step_mj;
    long long sm_clock_mhz;
    long long clock_event_reasons;
    long long mem_clock_mhz, min_sm_clock_mhz, max_sm_clock_mhz, clock_step_mhz, app_clock_mhz;
    long long locked_min_mhz, locked_max_mhz;
    unsigned seen; /* bitmask of required keys present */
} gpu_t;

typedef struct {
    int count;
    int nonroot;
    char driver_version[TEXT_LEN];
    gpu_t gpus[MAX_GPUS];
    int nfaults;
    fault_t faults[MAX_FAULTS];
    int ndelays;
    delay_t delays[MAX_DELAYS];
} state_t;

/* Every function the fake implements: a fault may only name one of these (a typo fails loudly). */
static const char *const IMPLEMENTED[] = {
    "nvmlInitWithFlags", "nvmlShutdown", "nvmlDeviceGetCount_v2", "nvmlDeviceGetHandleByIndex_v2",
    "nvmlDeviceGetName", "nvmlDeviceGetUUID", "nvmlDeviceGetIndex",
    "nvmlDeviceGetPowerManagementLimitConstraints", "nvmlDeviceGetPowerManagementDefaultLimit",
    "nvmlDeviceGetPowerManagementLimit", "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetFieldValues", "nvmlDeviceGetClockInfo",
    "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons",
    "nvmlDeviceSetPowerManagementLimit", "nvmlSystemGetDriverVersion", "nvmlDeviceGetMaxClockInfo",
    "nvmlDeviceGetClock", "nvmlDeviceGetSupportedMemoryClocks", "nvmlDeviceGetSupportedGraphicsClocks",
    "nvmlDeviceSetGpuLockedClocks", "nvmlDeviceResetGpuLockedClocks", NULL,
};

enum { K_NAME = 1, K_UUID = 2, K_MIN = 4, K_MAX = 8, K_DEFAULT = 16, K_LIMIT = 32, K_REQUIRED = 63 };

static pthread_mutex_t g_mutex = PTHREAD_MUTEX_INITIALIZER;
static int g_init_count;
static char g_state_path[4096];
static char g_log_path[4096];
static state_t S;
static struct nvmlDevice_st g_handles[MAX_GPUS];

static void complain(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("fake_nvml: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static void log_call(const char *fmt, ...) {
    char line[512];
    const char *path = g_log_path[0] ? g_log_path : getenv("FAKE_NVML_LOG");
    va_list ap;
    int n, fd;
    if (!path || !path[0]) return;
    va_start(ap, fmt);
    n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof line - 2) n = (int)sizeof line - 2;
    line[n++] = '\n';
    /* One O_APPEND write per line keeps lines whole across processes. */
    fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        complain("cannot open log %s: %s", path, strerror(errno));
        return;
    }
    if (write(fd, line, (size_t)n) != n) complain("short write to log %s", path);
    close(fd);
}

static int is_implemented(const char *fn) {
    for (int i = 0; IMPLEMENTED[i]; i++)
        if (strcmp(IMPLEMENTED[i], fn) == 0) return 1;
    return 0;
}

static int parse_ll(const char *text, long long *out) {
    char *end;
    if (!text || !*text) return -1;
    errno = 0;
    *out = strtoll(text, &end, 0);
    return (errno || *end) ? -1 : 0;
}

/* "none" (absent) or a number. */
static int parse_opt(const char *text, long long *out) {
    if (text && strcmp(text, "none") == 0) {
        *out = NONE;
        return 0;
    }
    return parse_ll(text, out);
}

static int parse_fault(char **tok, int ntok, int gpu, int lineno) {
    fault_t *f;
    long long code, times = 0;
    if (ntok < 2 || ntok > 3 || parse_ll(tok[1], &code) || (ntok == 3 && parse_ll(tok[2], &times)) ||
        times < 0) {
        complain("%s:%d: expected 'fail <function> <code> [times]'", g_state_path, lineno);
        return -1;
    }
    if (!is_implemented(tok[0])) {
        complain("%s:%d: fault for '%s', which the fake does not implement", g_state_path, lineno, tok[0]);
        return -1;
    }
    if (S.nfaults >= MAX_FAULTS) {
        complain("%s:%d: more than %d faults", g_state_path, lineno, MAX_FAULTS);
        return -1;
    }
    f = &S.faults[S.nfaults++];
    snprintf(f->fn, sizeof f->fn, "%s", tok[0]);
    f->gpu = gpu;
    f->code = (int)code;
    f->times = (int)times;
    return 0;
}

static int parse_delay(char **tok, int ntok, int gpu, int lineno) {
    long long ms;
    if (ntok != 2 || parse_ll(tok[1], &ms) || ms < 0 || !is_implemented(tok[0]) || S.ndelays >= MAX_DELAYS) {
        complain("%s:%d: expected 'delay <implemented function> <ms>' (at most %d)", g_state_path, lineno,
                 MAX_DELAYS);
        return -1;
    }
    snprintf(S.delays[S.ndelays].fn, sizeof S.delays[0].fn, "%s", tok[0]);
    S.delays[S.ndelays].gpu = gpu;
    S.delays[S.ndelays++].ms = ms;
    return 0;
}

/* The delay for (fn, gpu): a per-GPU entry wins over a global one; 0 when none. */
static long long delay_ms(const char *fn, int gpu) {
    long long global = 0;
    for (int i = 0; i < S.ndelays; i++) {
        if (strcmp(S.delays[i].fn, fn) != 0) continue;
        if (gpu >= 0 && S.delays[i].gpu == gpu) return S.delays[i].ms;
        if (S.delays[i].gpu < 0) global = S.delays[i].ms;
    }
    return global;
}

static int set_text(char *dst, const char *value, int lineno) {
    if (strlen(value) >= TEXT_LEN) {
        complain("%s:%d: value longer than %d characters", g_state_path, lineno, TEXT_LEN - 1);
        return -1;
    }
    strcpy(dst, value);
    return 0;
}

static int parse_gpu_key(gpu_t *g, const char *key, char *rest, int lineno) {
    struct {
        const char *key;
        long long *field;
        unsigned bit;
        int optional;
    } nums[] = {
        {"min_mw", &g->min_mw, K_MIN, 0},
        {"max_mw", &g->max_mw, K_MAX, 0},
        {"default_mw", &g->default_mw, K_DEFAULT, 0},
        {"limit_mw", &g->limit_mw, K_LIMIT, 0},
        {"external_limit_mw", &g->external_limit_mw, 0, 1},
        {"power_mw", &g->power_mw, 0, 0},
        {"instant_power_mw", &g->instant_power_mw, 0, 1},
        {"energy_mj", &g->energy_mj, 0, 0},
        {"energy_step_mj", &g->energy_step_mj, 0, 0},
        {"sm_clock_mhz", &g->sm_clock_mhz, 0, 0},
        {"clock_event_reasons", &g->clock_event_reasons, 0, 0},
        {"mem_clock_mhz", &g->mem_clock_mhz, 0, 0},
        {"min_sm_clock_mhz", &g->min_sm_clock_mhz, 0, 0},
        {"max_sm_clock_mhz", &g->max_sm_clock_mhz, 0, 0},
        {"clock_step_mhz", &g->clock_step_mhz, 0, 0},
        {"app_clock_mhz", &g->app_clock_mhz, 0, 0},
        {"locked_min_mhz", &g->locked_min_mhz, 0, 1},
        {"locked_max_mhz", &g->locked_max_mhz, 0, 1},
    };
    if (strcmp(key, "name") == 0) {
        g->seen |= K_NAME;
        return set_text(g->name, rest, lineno);
    }
    if (strcmp(key, "uuid") == 0) {
        g->seen |= K_UUID;
        return set_text(g->uuid, rest, lineno);
    }
    for (size_t i = 0; i < sizeof nums / sizeof nums[0]; i++) {
        if (strcmp(key, nums[i].key) != 0) continue;
        if ((nums[i].optional ? parse_opt(rest, nums[i].field) : parse_ll(rest, nums[i].field)) ||
            (*nums[i].field < 0 && !(nums[i].optional && *nums[i].field == NONE))) {
            complain("%s:%d: bad value '%s' for %s", g_state_path, lineno, rest, key);
            return -1;
        }
        g->seen |= nums[i].bit;
        return 0;
    }
    complain("%s:%d: unknown GPU key '%s'", g_state_path, lineno, key);
    return -1;
}

/* Splits at most max tokens on spaces; the last token keeps the rest of the line (names have spaces). */
static int split(char *line, char **tok, int max) {
    int n = 0;
    while (*line && n < max) {
        while (*line == ' ' || *line == '\t') line++;
        if (!*line) break;
        tok[n++] = line;
        if (n == max) break;
        while (*line && *line != ' ' && *line != '\t') line++;
        if (*line) *line++ = '\0';
    }
    if (n) { /* trim the trailing blanks of the last token */
        char *end = tok[n - 1] + strlen(tok[n - 1]);
        while (end > tok[n - 1] && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r')) *--end = '\0';
    }
    return n;
}

static int parse_state(char *text) {
    int lineno = 0;
    long long count = -1, value;
    char *save = NULL, *line;
    memset(&S, 0, sizeof S);
    strcpy(S.driver_version, DEFAULT_DRIVER_VERSION);
    for (int i = 0; i < MAX_GPUS; i++) {
        S.gpus[i].external_limit_mw = NONE;
        S.gpus[i].instant_power_mw = NONE;
        S.gpus[i].locked_min_mhz = NONE;
        S.gpus[i].locked_max_mhz = NONE;
    }
    for (line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char *tok[4];
        int n;
        lineno++;
        /* At most 4 tokens: "gpu <i> <key> <value with spaces>" or "fail <function> <code> <times>". */
        n = split(line, tok, 4);
        if (n == 0 || tok[0][0] == '#') continue;
        if (strcmp(tok[0], "count") == 0 && n == 2 && parse_ll(tok[1], &count) == 0) {
            if (count < 0 || count > MAX_GPUS) {
                complain("%s:%d: count must be 0..%d", g_state_path, lineno, MAX_GPUS);
                return -1;
            }
        } else if (strcmp(tok[0], "nonroot") == 0 && n == 2 && parse_ll(tok[1], &value) == 0) {
            S.nonroot = value != 0;
        } else if (strcmp(tok[0], "driver_version") == 0 && n == 2) {
            if (set_text(S.driver_version, tok[1], lineno)) return -1;
        } else if (strcmp(tok[0], "fail") == 0) {
            if (parse_fault(tok + 1, n - 1, -1, lineno)) return -1;
        } else if (strcmp(tok[0], "delay") == 0) {
            if (parse_delay(tok + 1, n - 1, -1, lineno)) return -1;
        } else if (strcmp(tok[0], "gpu") == 0) {
            if (n != 4 || parse_ll(tok[1], &value) || value < 0 || value >= MAX_GPUS) {
                complain("%s:%d: expected 'gpu <index> <key> <value>'", g_state_path, lineno);
                return -1;
            }
            if (strcmp(tok[2], "fail") == 0) {
                char *ftok[4];
                int fn = split(tok[3], ftok, 4);
                if (parse_fault(ftok, fn, (int)value, lineno)) return -1;
            } else if (strcmp(tok[2], "delay") == 0) {
                char *dtok[3];
                if (parse_delay(dtok, split(tok[3], dtok, 3), (int)value, lineno)) return -1;
            } else if (parse_gpu_key(&S.gpus[value], tok[2], tok[3], lineno)) {
                return -1;
            }
        } else {
            complain("%s:%d: unknown entry '%s'", g_state_path, lineno, tok[0]);
            return -1;
        }
    }
    if (count < 0) {
        complain("%s: no 'count' line", g_state_path);
        return -1;
    }
    S.count = (int)count;
    for (int i = 0; i < S.count; i++) {
        if ((S.gpus[i].seen & K_REQUIRED) != K_REQUIRED) {
            complain("%s: GPU %d lacks one of name, uuid, min_mw, max_mw, default_mw, limit_mw", g_state_path, i);
            return -1;
        }
    }
    for (int i = 0; i < S.ndelays; i++) {
        if (S.delays[i].gpu >= S.count) {
            complain("%s: delay for GPU %d, but count is %d", g_state_path, S.delays[i].gpu, S.count);
            return -1;
        }
    }
    for (int i = 0; i < S.nfaults; i++) {
        if (S.faults[i].gpu >= S.count) {
            complain("%s: fault for GPU %d, but count is %d", g_state_path, S.faults[i].gpu, S.count);
            return -1;
        }
    }
    return 0;
}

#define EMIT(...)                                                                    \
    do {                                                                             \
        int n_ = snprintf(buf + len, sizeof buf - len, __VA_ARGS__);                 \
        if (n_ < 0 || (size_t)n_ >= sizeof buf - len) return -1;                     \
        len += (size_t)n_;                                                           \
    } while (0)

static int emit_opt(char *out, size_t size, long long value) {
    return value == NONE ? snprintf(out, size, "none") : snprintf(out, size, "%lld", value);
}

/* Atomic: the new text goes to <state>.tmp, then rename(2) replaces the state file, so a process killed at
 * any point leaves the old file or the new one, never an empty or torn one. Called with <state>.lock held. */
static int write_state(void) {
    static char buf[FILE_MAX];
    size_t len = 0;
    EMIT("# fake NVML state (rewritten by fake_nvml.c)\ncount %d\nnonroot %d\n", S.count, S.nonroot);
    EMIT("driver_version %s\n", S.driver_version);
    for (int i = 0; i < S.nfaults; i++) {
        const fault_t *f = &S.faults[i];
        if (f->gpu >= 0) continue;
        EMIT(f->times ? "fail %s %d %d\n" : "fail %s %d\n", f->fn, f->code, f->times);
    }
    for (int i = 0; i < S.ndelays; i++) {
        if (S.delays[i].gpu < 0) EMIT("delay %s %lld\n", S.delays[i].fn, S.delays[i].ms);
        else EMIT("gpu %d delay %s %lld\n", S.delays[i].gpu, S.delays[i].fn, S.delays[i].ms);
    }
    for (int i = 0; i < S.count; i++) {
        const gpu_t *g = &S.gpus[i];
        char ext[32], inst[32];
        emit_opt(ext, sizeof ext, g->external_limit_mw);
        emit_opt(inst, sizeof inst, g->instant_power_mw);
        EMIT("gpu %d name %s\ngpu %d uuid %s\n", i, g->name, i, g->uuid);
        EMIT("gpu %d min_mw %lld\ngpu %d max_mw %lld\ngpu %d default_mw %lld\n", i, g->min_mw, i, g->max_mw, i,
             g->default_mw);
        EMIT("gpu %d limit_mw %lld\ngpu %d external_limit_mw %s\n", i, g->limit_mw, i, ext);
        EMIT("gpu %d power_mw %lld\ngpu %d instant_power_mw %s\n", i, g->power_mw, i, inst);
        EMIT("gpu %d energy_mj %lld\ngpu %d energy_step_mj %lld\n", i, g->energy_mj, i, g->energy_step_mj);
        EMIT("gpu %d sm_clock_mhz %lld\ngpu %d clock_event_reasons %lld\n", i, g->sm_clock_mhz, i,
             g->clock_event_reasons);
        emit_opt(ext, sizeof ext, g->locked_min_mhz);
        emit_opt(inst, sizeof inst, g->locked_max_mhz);
        EMIT("gpu %d mem_clock_mhz %lld\ngpu %d min_sm_clock_mhz %lld\ngpu %d max_sm_clock_mhz %lld\n", i,
             g->mem_clock_mhz, i, g->min_sm_clock_mhz, i, g->max_sm_clock_mhz);
        EMIT("gpu %d clock_step_mhz %lld\ngpu %d app_clock_mhz %lld\n", i, g->clock_step_mhz, i, g->app_clock_mhz);
        EMIT("gpu %d locked_min_mhz %s\ngpu %d locked_max_mhz %s\n", i, ext, i, inst);
        for (int j = 0; j < S.nfaults; j++) {
            const fault_t *f = &S.faults[j];
            if (f->gpu != i) continue;
            EMIT(f->times ? "gpu %d fail %s %d %d\n" : "gpu %d fail %s %d\n", i, f->fn, f->code, f->times);
        }
    }
    char tmp[sizeof g_state_path + 8];
    snprintf(tmp, sizeof tmp, "%s.tmp", g_state_path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return -1;
    if (write(fd, buf, len) != (ssize_t)len) {
        close(fd);
        return -1;
    }
    if (close(fd) != 0 || rename(tmp, g_state_path) != 0) return -1;
    return 0;
}

/* One call's hold on the state: the process mutex plus flock on <state>.lock (not on the state file itself,
 * which write_state replaces by rename: a lock on the replaced file would guard nothing). */
typedef struct {
    int fd;
    int dirty;
    int locked;
} session_t;

static nvmlReturn_t load(session_t *s) {
    static char buf[FILE_MAX];
    ssize_t n;
    char lock[sizeof g_state_path + 8];
    int fd;
    snprintf(lock, sizeof lock, "%s.lock", g_state_path);
    s->fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (s->fd < 0) {
        complain("cannot open state lock %s: %s", lock, strerror(errno));
        return NVML_ERROR_UNKNOWN;
    }
    if (flock(s->fd, LOCK_EX) != 0) {
        complain("cannot lock state %s: %s", lock, strerror(errno));
        return NVML_ERROR_UNKNOWN;
    }
    fd = open(g_state_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        complain("cannot open state %s: %s", g_state_path, strerror(errno));
        return NVML_ERROR_UNKNOWN;
    }
    n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n < 0 || n >= (ssize_t)sizeof buf - 1) {
        complain("cannot read state %s (or larger than %d bytes)", g_state_path, FILE_MAX - 2);
        return NVML_ERROR_UNKNOWN;
    }
    buf[n] = '\0';
    return parse_state(buf) == 0 ? NVML_SUCCESS : NVML_ERROR_UNKNOWN;
}

/* The injected fault for (fn, gpu), counting it down; NVML_SUCCESS when none. */
static nvmlReturn_t take_fault(session_t *s, const char *fn, int gpu) {
    for (int pass = 0; pass < 2; pass++) {
        int want = pass == 0 ? gpu : -1;
        for (int i = 0; i < S.nfaults; i++) {
            fault_t *f = &S.faults[i];
            if (f->gpu != want || strcmp(f->fn, fn) != 0) continue;
            nvmlReturn_t code = f->code;
            if (f->times > 0) { /* a counted fault: count it down, drop it at zero, persist */
                s->dirty = 1;
                if (--f->times == 0) {
                    memmove(f, f + 1, sizeof *f * (size_t)(S.nfaults - i - 1));
                    S.nfaults--;
                }
            }
            return code;
        }
        if (gpu < 0) break;
    }
    return NVML_SUCCESS;
}

/* Start of every call: lock, check init, load state, resolve the device, sleep any delay, apply faults. */
static nvmlReturn_t enter(session_t *s, const char *fn, nvmlDevice_t device, int *index) {
    nvmlReturn_t rc;
    long long ms;
    s->fd = -1;
    s->dirty = 0;
    s->locked = 1;
    pthread_mutex_lock(&g_mutex);
    if (g_init_count == 0) return NVML_ERROR_UNINITIALIZED;
    if ((rc = load(s)) != NVML_SUCCESS) return rc;
    *index = -1;
    if (device) {
        if (device < g_handles || device >= g_handles + MAX_GPUS || (int)device->index >= S.count)
            return NVML_ERROR_INVALID_ARGUMENT;
        *index = (int)device->index;
    }
    if ((ms = delay_ms(fn, *index)) > 0) {
        /* Sleep unlocked (a hung GPU must not block the others), then take the state afresh. */
        close(s->fd);
        s->fd = -1;
        pthread_mutex_unlock(&g_mutex);
        struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
        }
        pthread_mutex_lock(&g_mutex);
        if (g_init_count == 0) return NVML_ERROR_UNINITIALIZED;
        if ((rc = load(s)) != NVML_SUCCESS) return rc;
        if (*index >= S.count) return NVML_ERROR_INVALID_ARGUMENT;
    }
    return take_fault(s, fn, *index);
}

static nvmlReturn_t leave(session_t *s, nvmlReturn_t rc) {
    if (s->fd >= 0) {
        if (s->dirty && write_state() != 0) {
            complain("cannot write state %s", g_state_path);
            if (rc == NVML_SUCCESS) rc = NVML_ERROR_UNKNOWN;
        }
        close(s->fd); /* the lock file's: releases the flock */
    }
    if (s->locked) pthread_mutex_unlock(&g_mutex);
    return rc;
}

/* The SM clock in force: the unlocked clock clamped into the locked range, if any. */
static long long clock_in_force_mhz(const gpu_t *g) {
    long long mhz = g->sm_clock_mhz;
    if (g->locked_max_mhz != NONE && mhz > g->locked_max_mhz) mhz = g->locked_max_mhz;
    if (g->locked_min_mhz != NONE && mhz < g->locked_min_mhz) mhz = g->locked_min_mhz;
    return mhz;
}

static long long enforced_mw(const gpu_t *g) {
    if (g->external_limit_mw != NONE && g->external_limit_mw < g->limit_mw) return g->external_limit_mw;
    return g->limit_mw;
}

/* Test hook (not NVML): forget init state between tests that share the loaded library. */
void fakeNvmlReset(void) {
    pthread_mutex_lock(&g_mutex);
    g_init_count = 0;
    g_state_path[0] = '\0';
    g_log_path[0] = '\0';
    pthread_mutex_unlock(&g_mutex);
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    session_t s = {-1, 0, 1};
    nvmlReturn_t rc;
    const char *state = getenv("FAKE_NVML_STATE");
    const char *logp = getenv("FAKE_NVML_LOG");
    pthread_mutex_lock(&g_mutex);
    snprintf(g_log_path, sizeof g_log_path, "%s", logp ? logp : "");
    if (!state || !state[0]) {
        complain("FAKE_NVML_STATE is not set");
        rc = NVML_ERROR_DRIVER_NOT_LOADED;
    } else {
        snprintf(g_state_path, sizeof g_state_path, "%s", state);
        rc = load(&s);
        if (rc == NVML_SUCCESS) rc = take_fault(&s, "nvmlInitWithFlags", -1);
        if (rc == NVML_SUCCESS) g_init_count++;
    }
    rc = leave(&s, rc);
    log_call("nvmlInitWithFlags %u rc=%d", flags, rc);
    return rc;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    session_t s;
    int index;
    nvmlReturn_t rc = enter(&s, "nvmlShutdown", NULL, &index);
    if (rc == NVML_SUCCESS) g_init_count--;
    rc = leave(&s, rc);
    log_call("nvmlShutdown rc=%d", rc);
    return rc;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    /* Strings as nvmlErrorString documents them (nvml.h). */
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_RESET_REQUIRED: return "GPU requires restart";
    default: return "Unknown Error (fake_nvml)";
    }
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    session_t s;
    int index;
    nvmlReturn_t rc = enter(&s, __func__, NULL, &index);
    if (rc == NVML_SUCCESS) {
        if (!count) rc = NVML_ERROR_INVALID_ARGUMENT;
        else *count = (unsigned)S.count;
    }
    return leave(&s, rc);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int idx, nvmlDevice_t *device) {
    session_t s;
    int index;
    nvmlReturn_t rc = enter(&s, __func__, NULL, &index);
    if (rc == NVML_SUCCESS) rc = take_fault(&s, __func__, idx < MAX_GPUS ? (int)idx : -1);
    if (rc == NVML_SUCCESS) {
        if (!device || idx >= (unsigned)S.count) {
            rc = NVML_ERROR_INVALID_ARGUMENT;
        } else {
            g_handles[idx].index = idx;
            *device = &g_handles[idx];
        }
    }
    return leave(&s, rc);
}

static nvmlReturn_t copy_text(const char *text, char *out, unsigned int length) {
    if (!out) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(text) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(out, text);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    session_t s;
    int index;
    nvmlReturn_t rc = enter(&s, __func__, NULL, &index);
    if (rc == NVML_SUCCESS) rc = copy_text(S.driver_version, version, length);
    return leave(&s, rc);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    session_t s;
    int i;
    nvmlReturn_t rc = enter(&s, __func__, device, &i);
    if (rc == NVML_SUCCESS) rc = copy_text(S.gpus[i].name, name, length);
    return leave(&s, rc);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    session_t s;
    int i;
    nvmlReturn_t rc = enter(&s, __func__, device, &i);
    if (rc == NVML_SUCCESS) rc = copy_text(S.gpus[i].uuid, uuid, length);
    return leave(&s, rc);
}

/* A getter of one unsigned int: the common shape of most calls below. */
#define UINT_GETTER(fn, expr)                                         \
    nvmlReturn_t fn(nvmlDevice_t device, unsigned int *out) {         \
        session_t s;                                                  \
        int i;                                                        \
        nvmlReturn_t rc = enter(&s, #fn, device, &i);                 \
        if (rc == NVML_SUCCESS) {                                     \
            const gpu_t *g = &S.gpus[i];                              \
            (void)g;                                                  \
            if (!out) rc = NVML_ERROR_INVALID_ARGUMENT;               \
            else *out = (unsigned int)(expr);                         \
        }                                                             \
        return leave(&s, rc);                                         \
    }

UINT_GETTER(nvmlDeviceGetIndex, i)
UINT_GETTER(nvmlDeviceGetPowerManagementDefaultLimit, g->default_mw)
UINT_GETTER(nvmlDeviceGetPowerManagementLimit, g->limit_mw)
UINT_GETTER(nvmlDeviceGetEnforcedPowerLimit, enforced_mw(g))
UINT_GETTER(nvmlDeviceGetPowerUsage, g->power_mw < enforced_mw(g) ? g->power_mw : enforced_mw(g))

nvmlReturn_t nvmlDeviceGetPowerManagementLimitConstraints(nvmlDevice_t device, unsigned int *min_mw,
                                                          unsigned int *max_mw) {
    session_t s;
    int i;
    nvmlReturn_t rc = enter(&s, __func__, device, &i);
    if (rc == NVML_SUCCESS) {
        if (!min_mw || !max_mw) {
            rc = NVML_ERROR_INVALID_ARGUMENT;
        } else {
            *min_mw = (unsigned)S.gpus[i].min_mw;
            *max_mw = (unsigned)S.gpus[i].max_mw;
        }
    }
    return leave(&s, rc);
}

nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device, unsigned long long *energy_mj) {
    session_t s;
    int i;
    nvmlReturn_t rc = enter(&s, __func__, device, &i);
    if (rc == NVML_SUCCESS) {
        if (!energy_mj) {
            rc = NVML_ERROR_INVALID_ARGUMENT;
        } else {
            *energy_mj = (unsigned long long)S.gpus[i].energy_mj;
            if (S.gpus[i].energy_step_mj) {
                S.gpus[i].energy_mj += S.gpus[i].energy_step_mj;
                s.dirty = 1;
            }
        }
    }
    return leave(&s, rc);
}

nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t device, int valuesCount, nvmlFieldValue_t *values) {
    session_t s;
    int i;
    nvmlReturn_t rc = enter(&s, __func__, device, &i);
    if (rc == NVML_SUCCESS && (!values || valuesCount < 0)) rc = NVML_ERROR_INVALID_ARGUMENT;
    for (int k = 0; rc == NVML_SUCCESS && k < valuesCount; k++) {
        nvmlFieldValue_t *v = &values[k];
        v->timestamp = 0;
        v->latencyUsec = 0;
        if (v->fieldId == NVML_FI_DEV_POWER_INSTANT && S.gpus[i].instant_power_mw != NONE) {
            v->valueType = NVML_VALUE_TYPE_UNSIGNED_INT;
            v->nvmlReturn = NVML_SUCCESS;
            v->value.uiVal = (unsigned)S.gpus[i].instant_power_mw;
        } else {
            v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED; /* per-field failure, as NVML reports it */
        }
    }
    return leave(&s, rc);
}

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, int type, unsigned int *clock_mhz) {
    session_t s;
    int i;
    nvmlReturn_t rc = enter(&s, __func__, device, &i);
    if (rc == NVML_SUCCESS) {
        if (!clock_mhz) rc = NVML_ERROR_INVALID_ARGUMENT;
        else if (type == NVML_CLOCK_SM || type == NVML_CLOCK_GRAPHICS)
            *clock_mhz = (unsigned)clock_in_force_mhz(&S.gpus[i]);
        else if (type == NVML_CLOCK_MEM && S.gpus[i].mem_clock_mhz > 0)
            *clock_mhz = (unsigned)S.gpus[i].mem_clock_mhz;
        else rc = NVML_ERROR_NOT_SUPPORTED; /* other clock domains are not modelled */
    }
    return leave(&s, rc);
}

static nvmlReturn_t reasons(const char *fn, nvmlDevice_t device, unsigned long long *out) {
    session_t s;
    int i;
    nvmlReturn_t rc = enter(&s, fn, device, &i);
    if (rc == NVML_SUCCESS) {
        const gpu_t *g = &S.gpus[i];
        if (!out) rc = NVML_ERROR_INVALID_ARGUMENT;
        else
            *out = (unsigned long long)g->clock_event_reasons |
                   (g->power_mw > enforced_mw(g) ? CLOCKS_EVENT_REASON_SW_POWER_CAP : 0) |
                   (clock_in_force_mhz(g) != g->sm_clock_mhz ? CLOCKS_EVENT_REASON_APPLICATIONS_CLOCKS : 0);
    }
    return leave(&s, rc);
}

nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device, unsigned long long *out) {
    return reasons(__func__, device, out);
}

nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t device, unsigned long long *out) {
    return reasons(__func__, device, out);
}

nvmlReturn_t nvmlDeviceSetPowerManagementLimit(nvmlDevice_t device, unsigned int limit_mw) {
    session_t s;
    int i = -1;
    nvmlReturn_t rc = enter(&s, __func__, device, &i);
    if (rc == NVML_SUCCESS) {
        gpu_t *g = &S.gpus[i];
        if (S.nonroot) {
            rc = NVML_ERROR_NO_PERMISSION;
        } else if ((long long)limit_mw < g->min_mw || (long long)limit_mw > g->max_mw) {
            rc = NVML_ERROR_INVALID_ARGUMENT;
        } else {
            g->limit_mw = limit_mw;
            s.dirty = 1;
        }
    }
    rc = leave(&s, rc);
    if (i >= 0) log_call("nvmlDeviceSetPowerManagementLimit %d %u rc=%d", i, limit_mw, rc);
    else log_call("nvmlDeviceSetPowerManagementLimit ? %u rc=%d", limit_mw, rc);
    return rc;
}

nvmlReturn_t nvmlDeviceGetMaxClockInfo(nvmlDevice_t device, int type, unsigned int *clock_mhz) {
    session_t s;
    int i;
    nvmlReturn_t rc = enter(&s, __func__, device, &i);
    if (rc == NVML_SUCCESS) {
        const gpu_t *g = &S.gpus[i];
        long long mhz = (type == NVML_CLOCK_SM || type == NVML_CLOCK_GRAPHICS) ? g->max_sm_clock_mhz
                        : type == NVML_CLOCK_MEM                             ? g->mem_clock_mhz
                                                                              : 0;
        if (!clock_mhz) rc = NVML_ERROR_INVALID_ARGUMENT;
        else if (mhz <= 0) rc = NVML_ERROR_NOT_SUPPORTED;
        else *clock_mhz = (unsigned)mhz;
    }
    return leave(&s, rc);
}

nvmlReturn_t nvmlDeviceGetClock(nvmlDevice_t device, int type, int id, unsigned int *clock_mhz) {
    session_t s;
    int i;
    nvmlReturn_t rc = enter(&s, __func__, device, &i);
    if (rc == NVML_SUCCESS) {
        const gpu_t *g = &S.gpus[i];
        if (!clock_mhz || id < NVML_CLOCK_ID_CURRENT || id > NVML_CLOCK_ID_CUSTOMER_BOOST_MAX) {
            rc = NVML_ERROR_INVALID_ARGUMENT;
        } else if ((type != NVML_CLOCK_SM && type != NVML_CLOCK_GRAPHICS) || g->max_sm_clock_mhz <= 0) {
            rc = NVML_ERROR_NOT_SUPPORTED;
        } else if (id == NVML_CLOCK_ID_CURRENT) {
            *clock_mhz = (unsigned)clock_in_force_mhz(g);
        } else if (id == NVML_CLOCK_ID_APP_CLOCK_TARGET) {
            *clock_mhz = (unsigned)(g->app_clock_mhz > 0 ? g->app_clock_mhz : g->max_sm_clock_mhz);
        } else { /* the default applications clock and the customer boost maximum: the top clock */
            *clock_mhz = (unsigned)g->max_sm_clock_mhz;
        }
    }
    return leave(&s, rc);
}

/* The NVML list protocol: *count too small -> the size needed and INSUFFICIENT_SIZE; else fill. */
static nvmlReturn_t fill_list(const unsigned *items, unsigned n, unsigned int *count, unsigned int *out) {
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    if (*count < n) {
        *count = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    if (n > 0 && !out) return NVML_ERROR_INVALID_ARGUMENT;
    for (unsigned k = 0; k < n; k++) out[k] = items[k];
    *count = n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetSupportedMemoryClocks(nvmlDevice_t device, unsigned int *count, unsigned int *clocks) {
    session_t s;
    int i;
    nvmlReturn_t rc = enter(&s, __func__, device, &i);
    if (rc == NVML_SUCCESS) {
        unsigned mem = (unsigned)S.gpus[i].mem_clock_mhz;
        rc = fill_list(&mem, S.gpus[i].max_sm_clock_mhz > 0 && mem > 0 ? 1u : 0u, count, clocks);
    }
    return leave(&s, rc);
}

nvmlReturn_t nvmlDeviceGetSupportedGraphicsClocks(nvmlDevice_t device, unsigned int memory_mhz, unsigned int *count,
                                                  unsigned int *clocks) {
    session_t s;
    int i;
    static unsigned items[MAX_CLOCKS];
    nvmlReturn_t rc = enter(&s, __func__, device, &i);
    if (rc == NVML_SUCCESS) {
        const gpu_t *g = &S.gpus[i];
        unsigned n = 0;
        if (g->max_sm_clock_mhz <= 0 || (long long)memory_mhz != g->mem_clock_mhz) {
            rc = NVML_ERROR_NOT_FOUND; /* nvml.h: memoryClockMHz is not a supported frequency */
        } else {
            long long step = g->clock_step_mhz > 0 ? g->clock_step_mhz : g->max_sm_clock_mhz;
            for (long long mhz = g->max_sm_clock_mhz; mhz >= g->min_sm_clock_mhz && mhz > 0 && n < MAX_CLOCKS;
                 mhz -= step)
                items[n++] = (unsigned)mhz;
            rc = fill_list(items, n, count, clocks);
        }
    }
    return leave(&s, rc);
}

/* What a locked-clock setter checks first: root (nvml.h: "Requires root/admin permissions"), then support. */
static nvmlReturn_t clock_setter_allowed(const gpu_t *g) {
    if (S.nonroot) return NVML_ERROR_NO_PERMISSION;
    if (g->max_sm_clock_mhz <= 0) return NVML_ERROR_NOT_SUPPORTED;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceSetGpuLockedClocks(nvmlDevice_t device, unsigned int min_mhz, unsigned int max_mhz) {
    session_t s;
    int i = -1;
    nvmlReturn_t rc = enter(&s, __func__, device, &i);
    if (rc == NVML_SUCCESS && (rc = clock_setter_allowed(&S.gpus[i])) == NVML_SUCCESS) {
        gpu_t *g = &S.gpus[i];
        if (min_mhz > max_mhz || (long long)min_mhz < g->min_sm_clock_mhz ||
            (long long)max_mhz > g->max_sm_clock_mhz) {
            rc = NVML_ERROR_INVALID_ARGUMENT;
        } else {
            g->locked_min_mhz = min_mhz;
            g->locked_max_mhz = max_mhz;
            s.dirty = 1;
        }
    }
    rc = leave(&s, rc);
    if (i >= 0) log_call("nvmlDeviceSetGpuLockedClocks %d %u %u rc=%d", i, min_mhz, max_mhz, rc);
    else log_call("nvmlDeviceSetGpuLockedClocks ? %u %u rc=%d", min_mhz, max_mhz, rc);
    return rc;
}

nvmlReturn_t nvmlDeviceResetGpuLockedClocks(nvmlDevice_t device) {
    session_t s;
    int i = -1;
    nvmlReturn_t rc = enter(&s, __func__, device, &i);
    if (rc == NVML_SUCCESS && (rc = clock_setter_allowed(&S.gpus[i])) == NVML_SUCCESS) {
        S.gpus[i].locked_min_mhz = NONE;
        S.gpus[i].locked_max_mhz = NONE;
        s.dirty = 1;
    }
    rc = leave(&s, rc);
    if (i >= 0) log_call("nvmlDeviceResetGpuLockedClocks %d rc=%d", i, rc);
    else log_call("nvmlDeviceResetGpuLockedClocks ? rc=%d", rc);
    return rc;
}
