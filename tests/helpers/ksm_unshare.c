/*
 * KSM's unshare against the oracle's write tracker (tests/test_oracle_tracking.py): 64
 * anonymous pages (two contents, 32 copies each) registered with an asynchronous write-protect
 * userfaultfd like the oracle's, made mergeable; once ksmd merged them and they are protected
 * again, MADV_UNMERGEABLE breaks the KSM pages (break_ksm: an *unshare*, FAULT_FLAG_UNSHARE,
 * the path ksmd also takes when it gives up a merge half done). Prints
 *   merged=M moved=P written=W cow_ksm=C
 * M: 1 if ksmd merged (within 30 s); P: pages on another frame after the unshare; W: pages
 * PAGEMAP_SCAN reports written since the protect; C: the change of /proc/vmstat cow_ksm.
 * Seen on Linux 6.18: merged=1 moved=64 written=0 cow_ksm=64: the frames change, the tracker
 * says nothing, cow_ksm counts it (why harness/accounting.py treats cow_ksm as a frame move).
 *
 * Build: cc -O2 -Wall -Werror -o ksm_unshare ksm_unshare.c   (needs ksmd running, root)
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#define PG 4096
struct page_region { uint64_t start, end, categories; };
struct pm_scan_arg { uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages, category_inverted, category_mask, category_anyof_mask, return_mask; };
#define PAGEMAP_SCAN 0xC0606610
#define PM_SCAN_WP_MATCHING 1
#define PAGE_IS_WRITTEN 2
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1<<15)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1<<13)
#endif
#define N 64
static long vmstat(const char *k){FILE*f=fopen("/proc/vmstat","r");char n[128];long v,r=-1;while(fscanf(f,"%127s %ld",n,&v)==2)if(!strcmp(n,k))r=v;fclose(f);return r;}
static uint64_t pfn(int pm, void *a){uint64_t e;pread(pm,&e,8,((uintptr_t)a/PG)*8);return e&((1ULL<<55)-1);}
static long scan(int pm, char *b, int wp){struct page_region v[N];struct pm_scan_arg a={.size=sizeof a,.flags=wp?PM_SCAN_WP_MATCHING:0,.start=(uintptr_t)b,.end=(uintptr_t)b+N*PG,.vec=(uintptr_t)v,.vec_len=N,.category_mask=PAGE_IS_WRITTEN,.return_mask=PAGE_IS_WRITTEN};long n=ioctl(pm,PAGEMAP_SCAN,&a);long pages=0;for(long i=0;i<n;i++)pages+=(v[i].end-v[i].start)/PG;return n<0?n:pages;}
int main(void){
  char *b=mmap(NULL,N*PG,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0);
  for(int i=0;i<N;i++)memset(b+i*PG,0x5a+(i%2),PG); /* pairs of identical pages: 2 contents x 32 */
  int u=syscall(SYS_userfaultfd,O_CLOEXEC|O_NONBLOCK);
  struct uffdio_api api={.api=UFFD_API,.features=UFFD_FEATURE_WP_ASYNC|UFFD_FEATURE_WP_UNPOPULATED};
  if(ioctl(u,UFFDIO_API,&api)){perror("api");return 1;}
  struct uffdio_register r={.range={(uintptr_t)b,N*PG},.mode=UFFDIO_REGISTER_MODE_WP};
  if(ioctl(u,UFFDIO_REGISTER,&r)){perror("reg");return 1;}
  int pm=open("/proc/self/pagemap",O_RDONLY);
  scan(pm,b,1); /* protect everything */
  madvise(b,N*PG,MADV_MERGEABLE);
  for(int t=0;t<300;t++){usleep(100000);if(pfn(pm,b)==pfn(pm,b+2*PG))break;}
  int merged=pfn(pm,b)==pfn(pm,b+2*PG);
  scan(pm,b,1); /* the merges cleared uffd-wp bits (replace_page): protect again */
  if(scan(pm,b,0)!=0){printf("protect failed\n");return 1;}
  uint64_t p0[N];for(int i=0;i<N;i++)p0[i]=pfn(pm,b+i*PG);
  long c0=vmstat("cow_ksm");
  madvise(b,N*PG,MADV_UNMERGEABLE); /* break_ksm: unshare */
  long c1=vmstat("cow_ksm");
  int moved=0;for(int i=0;i<N;i++)if(pfn(pm,b+i*PG)!=p0[i])moved++;
  printf("merged=%d moved=%d written=%ld cow_ksm=%ld\n",merged,moved,scan(pm,b,0),c1-c0);
  return 0;}
