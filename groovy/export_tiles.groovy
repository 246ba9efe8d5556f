/**
 * Histo-UNet: export image tiles and label tiles from QuPath annotations (step 01, QuPath route).
 *
 * Purpose
 *   Writes, for the current image, fixed-size RGB tiles and matching label tiles made
 *   from the classified annotations, for training the U-Net. Same tiles as the Python
 *   route (notebooks/01_export_tiles.ipynb, helpers.tiles.export_tiles) with the same
 *   settings: same names and positions, same rules for which tiles are kept (at least
 *   minLabelledFraction labelled pixels; not more than maxGlassFraction glass), identical
 *   images, labels equal up to pixels on annotation edges (Python rasterizes with QuPath's
 *   pixel rule: a pixel is labelled when its top-left corner is inside an annotation).
 *
 * Requirements
 *   QuPath 0.5 or later. Tested headless with the classes of QuPath 0.5.1 and 0.7.0
 *   (LabeledImageServer, TileExporter, QP) by tests/test_qupath_groovy.py; the GUI itself
 *   is not tested. A project whose images have a pixel size in um, and annotations
 *   classified with the class names of data/classes.yaml.
 *
 * Inputs
 *   The current image of the project and its annotations. Unclassified annotations and
 *   classes not listed in CLASS_LABELS below are ignored (they stay 0 = unlabelled).
 *
 * Outputs  (in PROJECT_BASE_DIR/tiles/, one flat folder for all images)
 *   '<image> [d=D,x=X,y=Y,w=W,h=H].png'            RGB tile
 *   '<image> [d=D,x=X,y=Y,w=W,h=H]-labelled.png'   uint8 labels: 0 unlabelled, 1..N classes
 *   x, y, w, h in full-resolution pixels, D = level-0 pixels per tile pixel.
 *   Tiles are written to a temporary sub-folder first and only the kept ones are moved
 *   into tiles/ (tiles of the same name are replaced). Copy (or point) the folder to
 *   <workdir>/tiles, or give it to notebook 01 as qupath_tiles=...;
 *   helpers.tiles.read_tile_folder rebuilds the manifest from the names.
 *
 * Settings
 *   USER SETTINGS below: resolution, tile size, overlap, minimum labelled fraction, glass
 *   rule, class labels and drawing order. Their defaults are the Python route's defaults
 *   (tests/test_groovy.py checks it); change both routes together.
 *
 * How to run
 *   In QuPath: Automate > Script editor > open this file > Run (or Run > Run for project).
 *   Headless:  QuPath script -p project.qpproj groovy/export_tiles.groovy
 *              (the script path is positional; runs once per image of the project. Do not
 *              add -s: that is --save, which rewrites every image's data file.)
 *   Errors throw (they never just print): the message names the image and the fix. With
 *   -p, QuPath logs "Error running script for image: <name>" and goes on with the next
 *   image; with -i "<image name>" as well it runs that image only and rethrows the error,
 *   for a non-zero exit (QuPath's command-line code; the tests run qupath-script instead).
 *
 * Overlaps: LabeledImageServer paints class by class in the order the labels are added,
 * so where annotations of different classes overlap the class added last wins. DRAW_ORDER
 * below puts Tumor last, so tumour nests outlined inside a Stroma region keep their label.
 * (The Python route puts the smaller annotation on top, which agrees for nests drawn
 * inside larger regions.)
 */

import java.awt.image.BufferedImage
import java.nio.file.Files
import java.nio.file.StandardCopyOption
import javax.imageio.ImageIO
import qupath.lib.common.ColorTools
import qupath.lib.images.servers.LabeledImageServer
import qupath.lib.images.writers.TileExporter

// ===================== USER SETTINGS =====================
// Keep these identical to data/classes.yaml and to the Python route's parameters.
double requestedPixelSize = 1.0   // um per tile pixel (Python route: mpp)
int tileSize = 256                // tile side in pixels (Python route: tile_size)
int overlap = 0                   // pixels shared by neighbouring tiles (Python route: tile_size - stride)
double minLabelledFraction = 0.05 // keep tiles with at least this fraction of labelled pixels (Python route: min_labelled_fraction)
double maxGlassFraction = 0.95    // skip tiles with more glass than this, unless they hold glassClass labels; 1.0 keeps all (Python route: max_glass_fraction)
String glassClass = 'Background'  // the class of glass (Python route: background_class)
String outputFolder = 'tiles'     // sub-folder of the project folder
// QuPath class name -> label value (data/classes.yaml); 0 is reserved for unlabelled.
def CLASS_LABELS = [
    'Background': 1,
    'Tumor'     : 2,
    'Stroma'    : 3,
    'Other'     : 4,
]
// Where classes overlap, the class drawn last wins: put small, important classes last.
def DRAW_ORDER = ['Background', 'Other', 'Stroma', 'Tumor']
// =================== END USER SETTINGS ===================

// Glass pixels, as helpers.tissue.glass_mask with its defaults: HSV saturation < 0.08 and
// value > 0.78 (OpenCV's 8-bit HSV), a 3x3 opening, then glass specks and tissue holes
// smaller than 64 pixels (4-connected) removed / filled.
float GLASS_MAX_SATURATION = 0.08f
float GLASS_MIN_BRIGHTNESS = 0.78f
int GLASS_MIN_AREA = 64

def imageData = getCurrentImageData()
if (imageData == null)
    throw new IllegalStateException('export_tiles.groovy: no image is open; open an image or run this script for the project')
def server = imageData.getServer()
String imageName = server.getMetadata().getName()
def cal = server.getPixelCalibration()
if (!cal.hasPixelSizeMicrons())
    throw new IllegalArgumentException("export_tiles.groovy: ${imageName} has no pixel size in um; set it in Image > Pixel size, then rerun")
if (DRAW_ORDER.toSet() != CLASS_LABELS.keySet())
    throw new IllegalArgumentException("export_tiles.groovy: DRAW_ORDER ${DRAW_ORDER} must list exactly the classes of CLASS_LABELS ${CLASS_LABELS.keySet()}; fix the USER SETTINGS")
if (!(minLabelledFraction >= 0 && minLabelledFraction <= 1 && maxGlassFraction >= 0 && maxGlassFraction <= 1))
    throw new IllegalArgumentException("export_tiles.groovy: minLabelledFraction (${minLabelledFraction}) and maxGlassFraction (${maxGlassFraction}) must be within 0..1; fix the USER SETTINGS")
double downsample = requestedPixelSize / cal.getAveragedPixelSize().doubleValue()

def known = getAnnotationObjects().findAll { it.getPathClass() != null }*.getPathClass()*.toString().unique()
def unknown = known.findAll { !CLASS_LABELS.containsKey(it) }
if (!unknown.isEmpty())
    println "WARNING: classes ${unknown} are not in CLASS_LABELS ${CLASS_LABELS.keySet()}; they stay unlabelled"

def labelBuilder = new LabeledImageServer.Builder(imageData)
    .backgroundLabel(0, ColorTools.BLACK)   // unannotated pixels = 0 = unlabelled
    .downsample(downsample)
    .multichannelOutput(false)              // one label image with values 0..N
DRAW_ORDER.each { className -> labelBuilder.addLabel(className, CLASS_LABELS[className] as int) }
def labelServer = labelBuilder.build()

File outDir = new File(buildFilePath(PROJECT_BASE_DIR, outputFolder))
mkdirs(outDir.getPath())
File tmpDir = Files.createTempDirectory(outDir.toPath(), '.export-').toFile()
int glassLabel = CLASS_LABELS.containsKey(glassClass) ? (CLASS_LABELS[glassClass] as int) : -1
int nAll = 0, nFew = 0, nGlass = 0, nKept = 0
try {
    // Same image and label extension: TileExporter names label tiles '<stem>-labelled.png'.
    // annotatedTilesOnly: tiles without annotations are not even written.
    new TileExporter(imageData)
        .downsample(downsample)
        .imageExtension('.png')
        .labeledImageExtension('.png')
        .tileSize(tileSize)
        .overlap(overlap)
        .labeledServer(labelServer)
        .annotatedTilesOnly(true)
        .writeTiles(tmpDir.getPath())

    // Keep the tiles the Python route keeps (helpers.tiles.export_tiles), move them to outDir.
    for (File labelFile : tmpDir.listFiles().findAll { it.getName().endsWith('-labelled.png') }.sort()) {
        nAll++
        File imageFile = new File(tmpDir, labelFile.getName().replace('-labelled.png', '.png'))
        int[] counts = labelCounts(ImageIO.read(labelFile), glassLabel)   // [pixels, labelled pixels, glassClass pixels]
        if (counts[1] / (double) counts[0] < Math.max(minLabelledFraction, 1e-12)) {
            nFew++
            continue
        }
        if (maxGlassFraction < 1 && counts[2] == 0
                && glassFraction(ImageIO.read(imageFile), GLASS_MAX_SATURATION, GLASS_MIN_BRIGHTNESS, GLASS_MIN_AREA) > maxGlassFraction) {
            nGlass++
            continue
        }
        for (File f : [imageFile, labelFile])
            Files.move(f.toPath(), new File(outDir, f.getName()).toPath(), StandardCopyOption.REPLACE_EXISTING)
        nKept++
    }
} finally {
    tmpDir.deleteDir()
}
println "Exported ${nKept} tiles of ${imageName} at ${requestedPixelSize} um/px (downsample ${downsample}) to ${outDir}: " +
        "${nAll} annotated, ${nFew} under ${minLabelledFraction} labelled, ${nGlass} more than ${maxGlassFraction} glass"


/** [pixels, pixels > 0, pixels == glassLabel] of a label tile (an indexed PNG: the samples are the labels). */
@groovy.transform.CompileStatic
static int[] labelCounts(BufferedImage labels, int glassLabel) {
    def raster = labels.getRaster()
    int[] values = raster.getSamples(0, 0, raster.getWidth(), raster.getHeight(), 0, (int[]) null)
    int labelled = 0, glass = 0
    for (int v : values) {
        if (v > 0) labelled++
        if (v == glassLabel) glass++
    }
    return [values.length, labelled, glass] as int[]
}

/** Fraction of glass pixels of an RGB tile: helpers.tissue.glass_mask(image).mean() with its defaults. */
@groovy.transform.CompileStatic
static double glassFraction(BufferedImage img, float maxSaturation, float minBrightness, int minArea) {
    int w = img.getWidth(), h = img.getHeight(), n = w * h
    int[] rgb = img.getRGB(0, 0, w, h, null, 0, w)
    boolean[] glass = new boolean[n]
    for (int i = 0; i < n; i++) {
        int r = (rgb[i] >> 16) & 0xff, g = (rgb[i] >> 8) & 0xff, b = rgb[i] & 0xff
        int v = Math.max(r, Math.max(g, b)), diff = v - Math.min(r, Math.min(g, b))
        // OpenCV's 8-bit RGB2HSV saturation: fixed point, 12 fractional bits
        int s = v == 0 ? 0 : (int) ((diff * (int) Math.rint((255 << 12) / (double) v) + (1 << 11)) >> 12)
        // float32 as numpy (Groovy's / gives a double: round it to float, which is exact here)
        glass[i] = (float) (s / 255.0d) < maxSaturation && (float) (v / 255.0d) > minBrightness
    }
    glass = morph3x3(morph3x3(glass, w, h, true), w, h, false)   // opening: erode, then dilate
    if (minArea > 1) {
        glass = dropSmall(glass, w, h, minArea, true)    // glass specks -> tissue
        glass = dropSmall(glass, w, h, minArea, false)   // small tissue holes -> glass
    }
    int count = 0
    for (boolean x : glass)
        if (x) count++
    return count / (double) n
}

/** 3x3 erosion (erode=true) or dilation; pixels outside the tile are ignored (as OpenCV's default border). */
@groovy.transform.CompileStatic
static boolean[] morph3x3(boolean[] m, int w, int h, boolean erode) {
    boolean[] out = new boolean[m.length]
    for (int y = 0; y < h; y++) {
        for (int x = 0; x < w; x++) {
            boolean v = erode
            for (int dy = -1; dy <= 1 && v == erode; dy++) {
                int yy = y + dy
                if (yy < 0 || yy >= h) continue
                for (int dx = -1; dx <= 1; dx++) {
                    int xx = x + dx
                    if (xx < 0 || xx >= w) continue
                    if (m[yy * w + xx] != erode) { v = !erode; break }
                }
            }
            out[y * w + x] = v
        }
    }
    return out
}

/** Flip 4-connected components of pixels equal to `value` that have fewer than minArea pixels. */
@groovy.transform.CompileStatic
static boolean[] dropSmall(boolean[] m, int w, int h, int minArea, boolean value) {
    boolean[] out = m.clone()
    boolean[] seen = new boolean[m.length]
    int[] queue = new int[m.length]
    for (int start = 0; start < m.length; start++) {
        if (seen[start] || m[start] != value) continue
        int head = 0, tail = 0
        queue[tail++] = start
        seen[start] = true
        while (head < tail) {
            int p = queue[head++], x = p % w, y = Math.floorDiv(p, w)
            for (int k = 0; k < 4; k++) {
                int q = k == 0 ? (x > 0 ? p - 1 : -1) : k == 1 ? (x < w - 1 ? p + 1 : -1)
                        : k == 2 ? (y > 0 ? p - w : -1) : (y < h - 1 ? p + w : -1)
                if (q >= 0 && !seen[q] && m[q] == value) {
                    seen[q] = true
                    queue[tail++] = q
                }
            }
        }
        if (tail < minArea)
            for (int i = 0; i < tail; i++) out[queue[i]] = !value
    }
    return out
}
