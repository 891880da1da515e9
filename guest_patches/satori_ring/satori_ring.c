// SPDX-License-Identifier: GPL-2.0
/*
 * satori_ring: the guest side of the Satori hint ring.
 *
 * Binds the ivshmem-plain PCI device (1af4:1110), maps its BAR2 (a host
 * /dev/shm file, initialised by the host before the VM starts) and exports
 * satori_ring_push(), which the patched virtio_blk calls once per full 4 KiB
 * page of every completed READ.  satori_ring_partial() counts segments that
 * were not reported (partial or unaligned).
 *
 * The ring format is specified in docs/hint-ring.md of the satori harness;
 * the constants below must match it and harness/hints.py.
 *
 * Rules: push never blocks, never fails, never sleeps; it is callable from
 * hard-IRQ, softirq and process context on any CPU.  Producers are
 * serialised by one spinlock taken with irqsave (the critical section is a
 * 32-byte store plus a few counters, far below the cost of the xxh64 the
 * caller has already done outside the lock).  With no device bound, push
 * returns at once.  With the ring full, the record is dropped and counted.
 *
 * Counters (read-only): /sys/module/satori_ring/parameters/{records,dropped,
 * partial,attached,capacity}.
 */
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/io.h>
#include <linux/spinlock.h>
#include <linux/atomic.h>
#include <linux/moduleparam.h>

#define SATORI_VENDOR_ID	0x1af4
#define SATORI_DEVICE_ID	0x1110	/* ivshmem (plain / doorbell) */
#define SATORI_BAR		2

#define SATORI_MAGIC		0x524849524f544153ULL	/* bytes "SATORIHR", LE */
#define SATORI_VERSION		1
#define SATORI_HEADER_SIZE	4096
#define SATORI_RECORD_SIZE	32

#define SATORI_STATE_ATTACHED	1
#define SATORI_STATE_REJECTED	2

#define SATORI_FLAG_VALID	0x0001

/* Shared header: little-endian, 4096 bytes, see docs/hint-ring.md. */
struct satori_ring_header {
	/* written by the host before the VM starts, read-only for the guest */
	__le64 magic;		/*   0 */
	__le32 version;		/*   8 */
	__le32 header_size;	/*  12 */
	__le32 record_size;	/*  16 */
	__le32 capacity;	/*  20: records */
	__le64 ring_bytes;	/*  24: header_size + capacity * record_size */
	u8 pad0[32];		/*  32 */
	/* written by the guest */
	__le64 producer;	/*  64: records ever published */
	__le64 dropped;		/*  72: records dropped, ring full */
	__le64 partial;		/*  80: segments not reported */
	__le32 guest_state;	/*  88: 0 none, 1 attached, 2 rejected */
	__le32 guest_version;	/*  92 */
	u8 pad1[32];		/*  96 */
	/* written by the host */
	__le64 consumer;	/* 128: records consumed */
} __packed;

struct satori_record {
	__le64 gpa;
	__le64 hash;
	__le64 sector;
	__le16 disk;
	__le16 flags;
	__le32 seq;		/* low 32 bits of the record's position */
} __packed;

static_assert(sizeof(struct satori_record) == SATORI_RECORD_SIZE);
static_assert(offsetof(struct satori_ring_header, consumer) == 128);

struct satori_ring {
	struct pci_dev *pdev;
	void *base;			/* BAR2 mapping */
	struct satori_ring_header *hdr;
	struct satori_record *recs;
	u64 capacity;			/* guest-private copy, validated at probe */
	u64 producer;			/* guest-private copy of hdr->producer */
};

static DEFINE_SPINLOCK(satori_lock);
static struct satori_ring *satori_ring_dev;	/* protected by satori_lock */

static atomic64_t stat_records = ATOMIC64_INIT(0);
static atomic64_t stat_dropped = ATOMIC64_INIT(0);
static atomic64_t stat_partial = ATOMIC64_INIT(0);
static atomic64_t stat_attached = ATOMIC64_INIT(0);
static atomic64_t stat_capacity = ATOMIC64_INIT(0);

static int satori_counter_get(char *buf, const struct kernel_param *kp)
{
	return sysfs_emit(buf, "%lld\n", (long long)atomic64_read(kp->arg));
}

static int satori_counter_set(const char *val, const struct kernel_param *kp)
{
	return -EPERM;
}

static const struct kernel_param_ops satori_counter_ops = {
	.get = satori_counter_get,
	.set = satori_counter_set,
};

module_param_cb(records, &satori_counter_ops, &stat_records, 0444);
MODULE_PARM_DESC(records, "records published to the hint ring");
module_param_cb(dropped, &satori_counter_ops, &stat_dropped, 0444);
MODULE_PARM_DESC(dropped, "records dropped because the ring was full");
module_param_cb(partial, &satori_counter_ops, &stat_partial, 0444);
MODULE_PARM_DESC(partial, "read segments not reported (partial or unaligned)");
module_param_cb(attached, &satori_counter_ops, &stat_attached, 0444);
MODULE_PARM_DESC(attached, "1 when an ivshmem ring with a valid header is bound");
module_param_cb(capacity, &satori_counter_ops, &stat_capacity, 0444);
MODULE_PARM_DESC(capacity, "ring capacity in records (0 when not attached)");

void satori_ring_push(u64 gpa, u64 hash, u64 sector, u16 disk)
{
	struct satori_ring *r;
	struct satori_record *rec;
	unsigned long flags;
	u64 cons, pos;

	if (!READ_ONCE(satori_ring_dev))
		return;

	spin_lock_irqsave(&satori_lock, flags);
	r = satori_ring_dev;
	if (unlikely(!r))
		goto out;

	pos = r->producer;
	cons = le64_to_cpu(READ_ONCE(r->hdr->consumer));
	/*
	 * The consumer is written by the host.  Anything outside
	 * [pos - capacity, pos] counts as "full": drop instead of trusting it.
	 */
	if (unlikely(pos - cons >= r->capacity)) {
		WRITE_ONCE(r->hdr->dropped,
			   cpu_to_le64(le64_to_cpu(READ_ONCE(r->hdr->dropped)) + 1));
		atomic64_inc(&stat_dropped);
		goto out;
	}

	rec = &r->recs[pos % r->capacity];
	WRITE_ONCE(rec->gpa, cpu_to_le64(gpa));
	WRITE_ONCE(rec->hash, cpu_to_le64(hash));
	WRITE_ONCE(rec->sector, cpu_to_le64(sector));
	WRITE_ONCE(rec->disk, cpu_to_le16(disk));
	WRITE_ONCE(rec->flags, cpu_to_le16(SATORI_FLAG_VALID));
	WRITE_ONCE(rec->seq, cpu_to_le32((u32)pos));
	/* the record must be complete before the host can see the new producer */
	smp_wmb();
	r->producer = pos + 1;
	WRITE_ONCE(r->hdr->producer, cpu_to_le64(pos + 1));
	atomic64_inc(&stat_records);
out:
	spin_unlock_irqrestore(&satori_lock, flags);
}
EXPORT_SYMBOL_GPL(satori_ring_push);

void satori_ring_partial(unsigned int n)
{
	struct satori_ring *r;
	unsigned long flags;

	if (!n)
		return;
	atomic64_add(n, &stat_partial);
	if (!READ_ONCE(satori_ring_dev))
		return;
	spin_lock_irqsave(&satori_lock, flags);
	r = satori_ring_dev;
	if (r)
		WRITE_ONCE(r->hdr->partial,
			   cpu_to_le64(le64_to_cpu(READ_ONCE(r->hdr->partial)) + n));
	spin_unlock_irqrestore(&satori_lock, flags);
}
EXPORT_SYMBOL_GPL(satori_ring_partial);

static int satori_check_header(struct pci_dev *pdev,
			       struct satori_ring_header *hdr, u64 bar_len,
			       u64 *capacity)
{
	u64 magic = le64_to_cpu(READ_ONCE(hdr->magic));
	u32 version = le32_to_cpu(READ_ONCE(hdr->version));
	u32 hsize = le32_to_cpu(READ_ONCE(hdr->header_size));
	u32 rsize = le32_to_cpu(READ_ONCE(hdr->record_size));
	u64 cap = le32_to_cpu(READ_ONCE(hdr->capacity));

	if (magic != SATORI_MAGIC) {
		dev_warn(&pdev->dev, "bad magic %#llx, not a hint ring\n",
			 magic);
		return -ENODEV;
	}
	if (version != SATORI_VERSION || hsize != SATORI_HEADER_SIZE ||
	    rsize != SATORI_RECORD_SIZE || cap == 0 ||
	    SATORI_HEADER_SIZE + cap * SATORI_RECORD_SIZE > bar_len) {
		dev_warn(&pdev->dev,
			 "rejecting header: version %u header %u record %u capacity %llu bar %llu\n",
			 version, hsize, rsize, cap, bar_len);
		WRITE_ONCE(hdr->guest_version, cpu_to_le32(SATORI_VERSION));
		WRITE_ONCE(hdr->guest_state, cpu_to_le32(SATORI_STATE_REJECTED));
		return -EINVAL;
	}
	*capacity = cap;
	return 0;
}

static int satori_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct satori_ring *r;
	unsigned long flags;
	resource_size_t start, len;
	u64 cap;
	int err;

	if (READ_ONCE(satori_ring_dev)) {
		dev_info(&pdev->dev, "a ring is already bound, ignoring\n");
		return -EBUSY;
	}

	err = pcim_enable_device(pdev);
	if (err)
		return err;

	start = pci_resource_start(pdev, SATORI_BAR);
	len = pci_resource_len(pdev, SATORI_BAR);
	if (!start || len < SATORI_HEADER_SIZE + SATORI_RECORD_SIZE) {
		dev_warn(&pdev->dev, "BAR2 missing or too small (%llu)\n",
			 (u64)len);
		return -ENODEV;
	}
	if (!devm_request_mem_region(&pdev->dev, start, len, "satori_ring"))
		return -EBUSY;

	r = devm_kzalloc(&pdev->dev, sizeof(*r), GFP_KERNEL);
	if (!r)
		return -ENOMEM;
	/*
	 * BAR2 is ordinary host RAM (a /dev/shm file): map it write-back so the
	 * producer does cached stores, like any shared-memory ring.
	 */
	r->base = devm_memremap(&pdev->dev, start, len, MEMREMAP_WB);
	if (IS_ERR(r->base))
		return PTR_ERR(r->base);
	r->pdev = pdev;
	r->hdr = r->base;
	r->recs = r->base + SATORI_HEADER_SIZE;

	err = satori_check_header(pdev, r->hdr, len, &cap);
	if (err)
		return err;
	r->capacity = cap;
	/* continue after whatever an earlier boot left (host may keep the file) */
	r->producer = le64_to_cpu(READ_ONCE(r->hdr->producer));
	if (r->producer - le64_to_cpu(READ_ONCE(r->hdr->consumer)) > cap)
		r->producer = le64_to_cpu(READ_ONCE(r->hdr->consumer));
	WRITE_ONCE(r->hdr->producer, cpu_to_le64(r->producer));
	WRITE_ONCE(r->hdr->guest_version, cpu_to_le32(SATORI_VERSION));
	smp_wmb();
	WRITE_ONCE(r->hdr->guest_state, cpu_to_le32(SATORI_STATE_ATTACHED));

	pci_set_drvdata(pdev, r);
	spin_lock_irqsave(&satori_lock, flags);
	satori_ring_dev = r;
	spin_unlock_irqrestore(&satori_lock, flags);
	atomic64_set(&stat_capacity, cap);
	atomic64_set(&stat_attached, 1);
	dev_info(&pdev->dev, "attached, %llu records of %d bytes, bar %pa+%llu\n",
		 cap, SATORI_RECORD_SIZE, &start, (u64)len);
	return 0;
}

static void satori_remove(struct pci_dev *pdev)
{
	struct satori_ring *r = pci_get_drvdata(pdev);
	unsigned long flags;

	if (!r)
		return;
	spin_lock_irqsave(&satori_lock, flags);
	if (satori_ring_dev == r)
		satori_ring_dev = NULL;
	spin_unlock_irqrestore(&satori_lock, flags);
	/* no push can hold r now; devm unmaps the BAR after we return */
	WRITE_ONCE(r->hdr->guest_state, 0);
	atomic64_set(&stat_attached, 0);
	atomic64_set(&stat_capacity, 0);
}

static const struct pci_device_id satori_ids[] = {
	{ PCI_DEVICE(SATORI_VENDOR_ID, SATORI_DEVICE_ID) },
	{ 0 }
};
MODULE_DEVICE_TABLE(pci, satori_ids);

static struct pci_driver satori_driver = {
	.name = "satori_ring",
	.id_table = satori_ids,
	.probe = satori_probe,
	.remove = satori_remove,
};
module_pci_driver(satori_driver);

MODULE_DESCRIPTION("Satori hint ring over ivshmem-plain (guest producer)");
MODULE_AUTHOR("satori harness");
MODULE_LICENSE("GPL");
